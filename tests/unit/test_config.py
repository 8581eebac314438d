import pytest

from roofserve.cli import build_parser
from roofserve.config import VisionConfig, as_dict, make_config
from roofserve.errors import UserError


def test_cli_flag_beats_file_beats_default():
    args = build_parser().parse_args(["serve", "vision", "--max-batch-size", "16", "--no-channels-last"])
    cli = {k: v for k, v in vars(args).items() if k in VisionConfig.__dataclass_fields__}
    cfg = make_config(VisionConfig, {"max_batch_size": 4, "precision": "bf16"}, cli)
    assert cfg.max_batch_size == 16 and cfg.precision == "bf16" and cfg.channels_last is False
    assert cfg.workers_per_device == VisionConfig().workers_per_device


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"max_batch_sise": 4}, "unknown VisionConfig key 'max_batch_sise'"),
        ({"precision": "int3"}, "precision must be one of"),
        ({"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({"max_batch_size": "8"}, "max_batch_size must be int"),
        ({"port": 70000}, "port must be in"),
    ],
)
def test_bad_config_is_one_clear_error(layer, message):
    with pytest.raises(UserError, match=message):
        make_config(VisionConfig, layer)


def test_secrets_stay_out_of_result_files():
    assert as_dict(make_config(VisionConfig, {"api_key": "s3cret"}))["api_key"] == "***"
