"""roofserve: one entry point. Subcommands: serve, peak, bench, sweep, report."""

from __future__ import annotations

import argparse
import logging
import sys

from roofserve.config import VisionConfig, add_config_args, load_toml, make_config
from roofserve.errors import UserError


def _layers(args: argparse.Namespace, cls: type, section: str | None = None) -> VisionConfig:
    """Defaults < config file < CLI flags."""
    file_layer = None
    if args.config:
        doc = load_toml(args.config)
        file_layer = doc.get(section, doc) if section else doc
    cli_layer = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
    return make_config(cls, file_layer, cli_layer)


def cmd_serve_vision(args: argparse.Namespace) -> int:
    from roofserve.vision.serve import serve

    serve(_layers(args, VisionConfig, "server"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roofserve",
        description="Serve models with LitServe and measure how close they run to the hardware's roof.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="start a model server").add_subparsers(dest="what", metavar="MODEL", required=True)
    p = serve.add_parser(
        "vision",
        help="cat-vs-dog and dog-breed image classifier (POST /predict)",
        description="Serve an ImageNet classifier that answers cat / dog / other and the dog breed. "
        "POST /predict with raw image bytes (Content-Type: image/jpeg|png|webp), a multipart file upload, "
        "or JSON {\"image\": \"<base64>\"}.",
    )
    p.add_argument("--config", metavar="TOML", help="config file; its [server] table (or top level) sets these flags")
    add_config_args(p, VisionConfig)
    p.set_defaults(func=cmd_serve_vision)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except UserError as e:
        print(f"roofserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
