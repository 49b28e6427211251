"""The ``cam-vllm`` command line.

Subcommands live in :data:`cam_vllm.subcommands.SUBCOMMANDS`. To add one, write an
``add_arguments(parser)`` and a ``run(args) -> int`` function and call
:func:`~cam_vllm.subcommands.register_subcommand` (or add a ``Subcommand`` to the dict). Import
heavy modules inside ``run`` so that ``cam-vllm --help`` stays fast. A ``run`` that raises
:class:`~cam_vllm.errors.CamVllmError` gets its message printed without a traceback and exit
status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cam_vllm import __version__, subcommands
from cam_vllm.errors import CamVllmError
from cam_vllm.subcommands import register_subcommand

# --- prepare-model ------------------------------------------------------------------------------


def _prepare_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="directory for the converted checkpoint (default: $CAM_VLLM_CACHE/models/smollm2-135m-instruct, "
        "CAM_VLLM_CACHE defaulting to ~/.cache/cam-vllm)",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if a valid cache exists")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only verify an existing prepared model; never convert (exit status 1 if missing or corrupted)",
    )


def _prepare_model_run(args: argparse.Namespace) -> int:
    from cam_vllm import models

    if args.check:
        path = args.cache_dir or models.default_model_path()
        models.verify_model(path)
    else:
        path = models.prepare_model(args.cache_dir, force=args.force)
    print(path)
    return 0


register_subcommand(
    "prepare-model",
    "convert the packaged SmolLM2-135M-Instruct GGUF into a cached bf16 checkpoint (once) and print its path",
    _prepare_model_arguments,
    _prepare_model_run,
)


# --- eval: cam_vllm/eval/cli.py registers the `eval` subcommand (its module is light, no torch) ---
import cam_vllm.bench  # noqa: E402,F401  (`bench`)
import cam_vllm.eval.cli  # noqa: E402,F401
import cam_vllm.loadtest  # noqa: E402,F401  (`load-test`)

# --- entry point ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cam-vllm", description="KV-cache eviction with CaM cache merging (reference tools)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in subcommands.SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="cam-vllm: %(message)s",
        stream=sys.stderr,
    )
    try:
        return subcommands.SUBCOMMANDS[args.command].run(args) or 0
    except CamVllmError as error:
        print(f"cam-vllm: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cam-vllm: interrupted", file=sys.stderr)
        return 130
