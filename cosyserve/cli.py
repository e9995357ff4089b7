"""The `cosyserve` command. Each sub-command lives in its own module, imported only when used,
and exposes ``configure_parser(parser)`` and ``main(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("cosyserve.server.launch", "start the HTTP server (auto-configures for this machine)"),
    "wyoming": (
        "cosyserve.realtime.wyoming",
        "serve the Wyoming protocol (Home Assistant) on tcp://0.0.0.0:10200",
    ),
    "say": ("cosyserve.tools.say", "synthesise text to a WAV file"),
    "make-model": (
        "cosyserve.tools.make_model",
        "write a random-weight model directory in the official format",
    ),
    "bench": ("cosyserve.tools.bench", "benchmark RTF, first-chunk latency and per-stage times"),
    "diagnose": (
        "cosyserve.tools.diagnose",
        "check Python, torch, CUDA, TensorRT, ONNX Runtime and a model directory",
    ),
    "precompile": ("cosyserve.tools.precompile", "export ONNX and build TensorRT engines ahead of time"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosyserve", description="Fast CosyVoice inference server")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:  # a command whose optional dependencies are missing
            sub_parser.set_defaults(_import_error=exc)
            continue
        module.configure_parser(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_import_error", None) is not None:
        print(f"cosyserve {args.command}: unavailable: {args._import_error}", file=sys.stderr)
        return 1
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
