import pytest
import timm
import torch

from roofserve.errors import UserError
from roofserve.vision.model import convert_lukemelas, default_weights_path, load_state_dict


def test_bundled_lukemelas_weights_load_strictly_into_timm():
    state = convert_lukemelas(load_state_dict(default_weights_path()))
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    assert torch.equal(net.conv_stem.weight, state["conv_stem.weight"])


def test_block_layout_maps_flat_blocks_to_stages():
    state = load_state_dict(default_weights_path())
    out = convert_lukemelas(state)
    # block 0 is depthwise-separable: its project conv becomes conv_pw, not conv_pwl
    assert torch.equal(out["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    # block 15 is the only block of the last stage
    assert torch.equal(out["blocks.6.0.conv_pwl.weight"], state["_blocks.15._project_conv.weight"])
    # block 3 is the first block of stage 2 (stages of 1, 2, 2, ... blocks)
    assert torch.equal(out["blocks.2.0.conv_dw.weight"], state["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(out["classifier.bias"], state["_fc.bias"])


def test_unexpected_keys_are_refused():
    with pytest.raises(ValueError, match="unexpected key"):
        convert_lukemelas({"_blocks.0._mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="outside the stage layout"):
        convert_lukemelas({"_blocks.99._depthwise_conv.weight": torch.zeros(1)})


def test_pickles_load_only_as_weights(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(UserError, match="safe torch weights"):
        load_state_dict(path)
    with pytest.raises(UserError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")
