"""Settings, fuzzed over every route they arrive by: ``--kv-*`` flags through vLLM's real
``vllm serve`` parser, ``--additional-config`` JSON, and ``vllm.LLM(additional_config=...)`` dicts.

Every generated configuration must end in exactly one of: an argparse error naming the flag, a
:class:`KVPolicyStartupError` naming the problem, or a resolved policy whose KV spec and memory
bound can be built for the engine (block size, ``max_model_len``). Anything else (a TypeError,
a ZeroDivisionError, an assertion) is a crash a user would see as a traceback. Engines are
started for representative accepted configurations elsewhere (test_vllm_startup.py,
test_vllm_load.py, ...); here the checks stop just before the engine.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from cam_vllm.policies import policy_names  # noqa: E402
from cam_vllm.vllm_plugin.cli import _FLAGS  # noqa: E402
from cam_vllm.vllm_plugin.startup import KVPolicyStartupError, policy_or_error  # noqa: E402

pytestmark = pytest.mark.engine  # needs vLLM's parser (no engine is started)

NUMBERS = st.sampled_from(["0", "1", "-1", "3", "4", "16", "31", "32", "64", "96", "100", "128", "1024"])
ODD_TEXT = st.sampled_from(["", "abc", "1e3", "0.5", "nan", "inf", "-0.0", "2**4", "1,2", " 64"])
FLAG_VALUES = {
    "--kv-policy": st.one_of(st.sampled_from(policy_names()), st.sampled_from(["h3o", "", "CAM-STREAMING"])),
    "--kv-merge": st.sampled_from(["cam", "weighted", "kvmerger", "none", "mean", ""]),
    "--kv-budget": st.one_of(st.sampled_from(["0", "0.01", "0.1", "0.5", "1", "1.5", "-0.2"]), ODD_TEXT),
    "--kv-score-threshold": st.one_of(st.sampled_from(["0", "0.5", "1", "2", "-1"]), ODD_TEXT),
    "--kv-merge-similarity": st.one_of(st.sampled_from(["-1", "0", "0.8", "1", "1.5"]), ODD_TEXT),
}
for _flag in _FLAGS:
    FLAG_VALUES.setdefault(_flag, st.one_of(NUMBERS, NUMBERS, ODD_TEXT))
ENGINE = st.fixed_dictionaries(
    {"block_size": st.sampled_from([16, 32, 128]), "max_model_len": st.sampled_from([64, 256, 2048, 8192])}
)


@pytest.fixture(scope="module")
def serve_parser():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm", exit_on_error=False)
    subparsers = parser.add_subparsers(dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


def _engine_config(additional: dict, engine: dict) -> SimpleNamespace:
    return SimpleNamespace(
        additional_config=additional,
        cache_config=SimpleNamespace(block_size=engine["block_size"]),
        model_config=SimpleNamespace(max_model_len=engine["max_model_len"]),
        max_in_flight_tokens=512,
    )


def _accepted_policy_is_buildable(policy, engine: dict) -> None:
    """What the engine builds next from an accepted policy: the layer's KV spec and its bound."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from cam_vllm.vllm_plugin.kv_manager import policy_kv_spec

    if policy is None:
        return
    base = FullAttentionSpec(
        block_size=engine["block_size"], num_kv_heads=2, head_size=64, dtype=torch.float32
    )
    spec = policy_kv_spec(base, policy, _engine_config({}, engine))
    blocks = spec.max_blocks(engine["max_model_len"])
    assert 1 <= blocks <= -(-engine["max_model_len"] // engine["block_size"])
    assert policy.eviction.max_retained_tokens() >= engine["block_size"]


def _resolve(additional: dict, engine: dict) -> str:
    try:
        policy = policy_or_error(_engine_config(additional, engine))
    except KVPolicyStartupError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return "refused"
    _accepted_policy_is_buildable(policy, engine)
    return "accepted"


def test_flags_end_in_a_policy_or_a_clear_error(serve_parser):
    from vllm.engine.arg_utils import AsyncEngineArgs

    seen: dict[str, int] = {}

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(flags=st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=6, unique=True), data=st.data())
    def case(flags, data):
        argv = ["serve", "some/model"]
        for flag in flags:
            value = data.draw(FLAG_VALUES[flag], label=flag)
            # vLLM's parser reads a separate "-0.2" as a dotted flag and fails with an IndexError
            # traceback (any float flag, not only ours: docs/reliability.md); "--flag=-0.2" works
            argv += [f"{flag}={value}"] if value.startswith("-") else [flag, value]
        engine = data.draw(ENGINE, label="engine")
        try:
            args = serve_parser.parse_args(argv)
        except SystemExit:  # argparse printed "vllm serve: error: argument --kv-...: ..."
            seen["argparse"] = seen.get("argparse", 0) + 1
            return
        args.model = args.model_tag
        try:
            engine_args = AsyncEngineArgs.from_cli_args(args)
        except KVPolicyStartupError as exc:
            assert str(exc)
            seen["refused"] = seen.get("refused", 0) + 1
            return
        outcome = _resolve(engine_args.additional_config or {}, engine)
        seen[outcome] = seen.get(outcome, 0) + 1

    case()
    assert all(seen.get(k, 0) >= 10 for k in ("argparse", "refused", "accepted")), seen


SETTING_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(policy_names()),
    st.lists(st.integers(0, 2), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)
SETTING_KEYS = st.sampled_from(
    [
        "policy",
        "merge",
        "sink_tokens",
        "window_tokens",
        "budget",
        "block_size",
        "merge_targets",
        "merge_clamp",
    ]
    + ["merge_target_mode", "merge_similarity", "heavy_tokens", "score_history", "score_threshold"]
    + ["score_mode", "seed", "windowtokens", "kv_policy"]
)


def test_additional_config_ends_in_a_policy_or_a_clear_error():
    seen: dict[str, int] = {}

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(
        value=st.one_of(
            st.fixed_dictionaries({"policy": st.sampled_from(policy_names())}).flatmap(
                lambda base: st.dictionaries(SETTING_KEYS, SETTING_VALUES, max_size=4).map(
                    lambda d: {**base, **d}
                )
            ),
            SETTING_VALUES,
        ),
        engine=ENGINE,
        flat=st.booleans(),
    )
    def case(value, engine, flat):
        if flat and isinstance(value, dict):  # {"kv_policy": "name", "kv_window_tokens": ...}
            rest = {f"kv_{k}": v for k, v in value.items() if k != "policy"}
            additional = {"kv_policy": value.get("policy"), **rest}
        else:
            additional = {"kv_policy": value}
        json.dumps(additional, allow_nan=True)  # what --additional-config and the LLM route carry
        outcome = _resolve(additional, engine)
        seen[outcome] = seen.get(outcome, 0) + 1

    case()
    assert seen.get("accepted", 0) >= 10 and seen.get("refused", 0) >= 20, seen
