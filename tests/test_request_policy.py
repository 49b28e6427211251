"""Per-request full cache (``vllm_xargs={"kv_policy": "none"}``): the API server's check, and the
workers' plan for a batch that mixes full-cache and evicting requests (pure logic, no engine).
Through HTTP with a real server: ``tests/test_vllm_load.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cam_vllm.config import KVPolicyConfig
from cam_vllm.policies import build_policy
from cam_vllm.vllm_plugin.request_policy import check_request
from cam_vllm.vllm_plugin.step_plan import StepTokens, compact_for_kernel, plan_scores

BLOCK, SINKS, WINDOW = 16, 4, 32


def _check(extra, allow=True, num_tokens=100, pool=1000):
    return check_request(
        extra, server_policy="cam-streaming", allow_full=allow, num_tokens=num_tokens, pool_tokens=pool
    )


def test_the_full_cache_is_granted_only_where_the_server_allows_it_and_it_fits():
    assert _check({"kv_policy": "none"}) is True
    assert _check({"kv_policy": "cam-streaming"}) is False  # the server's own policy: nothing changes
    assert _check({"session_id": "x"}) is False  # other extensions are not ours
    assert _check(None) is False
    with pytest.raises(ValueError, match="not allowed by this server.*--kv-allow-full-cache-requests"):
        _check({"kv_policy": "none"}, allow=False)
    with pytest.raises(ValueError, match="need 1300 KV tokens.*pool holds 1000"):
        _check({"kv_policy": "none"}, num_tokens=1300)
    with pytest.raises(ValueError, match="kv_policy='h2o' is not available per request"):
        _check({"kv_policy": "h2o"})
    with pytest.raises(ValueError, match=r"\['kv_window'\] cannot be set per request"):
        _check({"kv_window": 32})


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["kv_policy", "kv_window", "kv_seed", "kv_budget", "seed", "other", "kv_x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=12), st.sampled_from(["none", "cam-streaming"])),
        max_size=4,
    ),
    st.booleans(),
    st.integers(0, 5000),
)
def test_any_per_request_fields_are_accepted_or_refused_by_name(extra, allow, num_tokens):
    try:
        full = _check(extra, allow=allow, num_tokens=num_tokens)
    except ValueError as exc:
        assert "vllm_xargs" in str(exc)
        return
    assert full == (extra.get("kv_policy") == "none")
    assert not full or (allow and num_tokens <= 1000)


def _policy(name: str):
    heavy = {"heavy_tokens": 32} if "h2o" in name else {}
    return build_policy(
        KVPolicyConfig(policy=name, sink_tokens=SINKS, window_tokens=WINDOW, block_size=BLOCK, **heavy)
    )


def _batch(full):
    """Two requests decoding far past the window (200 and 150 tokens cached), one block each of
    their own physical blocks; ``full`` flags which keep the full cache."""
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    seq_lens = torch.tensor([208, 160], dtype=torch.int32)  # both end a block: tokens leave now
    table = torch.arange(1, 27, dtype=torch.int32).view(2, 13)
    flags = None if full is None else torch.tensor(full)
    return StepTokens.from_batch(qsl, seq_lens, 2, flags), table


@pytest.mark.parametrize("name", ["streaming", "cam-streaming", "h2o", "cam-h2o"])
def test_a_full_cache_row_sees_its_whole_prefix_and_the_other_row_is_unchanged(name):
    policy = _policy(name)
    evicting, table = _batch(None)
    mixed, _ = _batch([True, False])
    base = compact_for_kernel(policy.eviction.retained, evicting, table, BLOCK)
    got = compact_for_kernel(policy.eviction.retained, mixed, table, BLOCK)
    assert base is not None and got is not None
    # request 0 keeps every block, in order; request 1 gets exactly the row it had without the flag
    assert got.request.tolist() == [0, 1]
    assert int(got.seq_lens[0]) == 208
    assert got.block_table[0, :13].tolist() == table[0].tolist()
    assert int(got.seq_lens[1]) == int(base.seq_lens[1]) < 160
    assert (
        got.block_table[1].tolist()[: int(base.seq_lens[1]) // BLOCK + 1]
        == (base.block_table[1].tolist()[: int(base.seq_lens[1]) // BLOCK + 1])
    )
    both, _ = _batch([True, True])
    assert compact_for_kernel(policy.eviction.retained, both, table, BLOCK) is None  # the stock batch


@pytest.mark.parametrize("name", ["cam-streaming", "h2o", "cam-h2o"])
def test_a_full_cache_row_never_merges_nor_fills_a_heavy_region(name):
    policy = _policy(name)
    slots = torch.tensor([208 * 0 + 12 * BLOCK + 15, 13 * BLOCK + 9 * BLOCK + 15])
    evicting, table = _batch(None)
    mixed, _ = _batch([True, False])
    plain = plan_scores(policy, evicting, table, slots, BLOCK)
    got = plan_scores(policy, mixed, table, slots, BLOCK)
    events = plain.heavy if plain.heavy is not None and len(plain.heavy) else plain.merges
    assert len(events) >= 1, "without the flag both requests lose tokens in this step"
    request0 = set((table[0].to(torch.int64)[:, None] * BLOCK + torch.arange(BLOCK)).flatten().tolist())
    if got.heavy is not None and len(got.heavy):
        assert len(plain.heavy) == 2 and len(got.heavy) == 1
        touched = {
            s for e in got.heavy for t in (e.heavy_slots, e.leaving_slots, e.receivers) for s in t.tolist()
        }
    else:
        assert sum(m.slots.shape[0] for m in plain.merges) == 2
        assert sum(m.slots.shape[0] for m in got.merges) == 1
        touched = {s for m in got.merges for s in m.slots.flatten().tolist()}
    assert touched and not touched & request0


def test_the_engine_serves_a_full_cache_request_that_cannot_fit_with_its_policy(monkeypatch):
    """Where the API server's check did not run, a full-cache request longer than the pool is not
    registered (it could never finish) and loses the field before its first scheduling, so the
    workers plan it with the policy too; one that fits is registered."""
    from types import SimpleNamespace

    from cam_vllm.vllm_plugin import request_policy as rp
    from cam_vllm.vllm_plugin.process_state import ENGINE

    monkeypatch.setattr(ENGINE, "block_size", 32)
    monkeypatch.setattr(ENGINE, "allows_full", True)
    assert rp.pool_tokens(40, 32) == 39 * 32 and rp.pool_tokens(80, 32, engines=2) == 39 * 32
    assert rp.pool_tokens(None, 32) is None
    manager = SimpleNamespace(block_pool=SimpleNamespace(num_gpu_blocks=40))

    def request(rid, prompt, max_tokens):
        params = SimpleNamespace(extra_args={"kv_policy": "none", "other": 1})
        return SimpleNamespace(
            request_id=rid, num_prompt_tokens=prompt, max_tokens=max_tokens, sampling_params=params
        )

    fits, too_long = request("a", 1000, 248), request("b", 1000, 249)
    assert rp._fits(manager, fits) and not rp._fits(manager, too_long)
    rp.on_allocate(manager, fits)
    rp.on_allocate(manager, too_long)
    try:
        assert "a" in ENGINE.full_cache_requests and "b" not in ENGINE.full_cache_requests
        assert too_long.sampling_params.extra_args == {"other": 1}  # what the workers will see
        assert fits.sampling_params.extra_args["kv_policy"] == "none"
    finally:
        rp.release_full("a")
    assert not ENGINE.full_cache_requests


def test_a_requests_own_window_is_read_alike_by_scheduler_and_workers():
    from types import SimpleNamespace

    from cam_vllm.vllm_plugin.request_policy import request_window

    def params(**extra):
        return SimpleNamespace(extra_args=extra)

    assert request_window(params(kv_window_tokens=32), "streaming", 64, 16) == 32
    assert request_window(params(kv_window_tokens=64), "streaming", 64, 16) == 0  # the server's own
    for bad in (24, 80, 0, "32", True, None):  # what the API server refuses counts as none
        assert request_window(params(kv_window_tokens=bad), "streaming", 64, 16) == 0
    assert request_window(params(kv_window_tokens=32), "cam-streaming", 64, 16) == 0
    assert request_window(params(kv_window_tokens=32, kv_policy="none"), "streaming", 64, 16) == 0
    assert request_window(SimpleNamespace(extra_args=None), "streaming", 64, 16) == 0
    assert _check_window({"kv_window_tokens": 16}) is False
    for value, message in (
        (24, "multiple of the block size 16"),
        (96, "server's window 64"),
        ("x", "integer"),
    ):
        with pytest.raises(ValueError, match=message):
            _check_window({"kv_window_tokens": value})
    with pytest.raises(ValueError, match="'streaming' server only"):
        _check({"kv_window_tokens": 16})
    with pytest.raises(ValueError, match="token-exact"):  # its own window would be planned in blocks
        check_request(
            {"kv_window_tokens": 32}, server_policy="streaming", allow_full=True, num_tokens=10,
            pool_tokens=100, window_tokens=64, block_size=16, token_exact=True,
        )  # fmt: skip


def _check_window(extra):
    return check_request(
        extra, server_policy="streaming", allow_full=True, num_tokens=10, pool_tokens=100, window_tokens=64,
        block_size=16,
    )  # fmt: skip


def test_a_row_with_its_own_window_is_planned_as_under_a_policy_with_that_window():
    """Row 1 keeps a 16-token window on a 32-token streaming policy: its compacted row equals the
    row a 16-token policy gives it, row 0 is unchanged."""
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    seq_lens = torch.tensor([200, 150], dtype=torch.int32)
    table = torch.arange(1, 27, dtype=torch.int32).view(2, 13)
    wide, narrow = (
        _policy("streaming"),
        build_policy(
            KVPolicyConfig(policy="streaming", sink_tokens=SINKS, window_tokens=16, block_size=BLOCK)
        ),
    )
    own = StepTokens.from_batch(qsl, seq_lens, 2, window=torch.tensor([0, 16]), layout=wide.eviction.layout)
    got = compact_for_kernel(wide.eviction.retained, own, table, BLOCK)
    base_wide = compact_for_kernel(
        wide.eviction.retained, StepTokens.from_batch(qsl, seq_lens, 2), table, BLOCK
    )
    base_narrow = compact_for_kernel(
        narrow.eviction.retained, StepTokens.from_batch(qsl, seq_lens, 2), table, BLOCK
    )
    assert got.seq_lens.tolist() == [int(base_wide.seq_lens[0]), int(base_narrow.seq_lens[1])]
    assert got.block_table[0].tolist() == base_wide.block_table[0].tolist()
    assert got.block_table[1].tolist() == base_narrow.block_table[1].tolist()


# --- a request's own prompt hold (vllm_xargs kv_prompt_hold) ------------------------------------


def _hold_options(name: str, **extra):
    from cam_vllm.policies import hold_options

    cfg = {"heavy_tokens": 32} if name not in ("streaming", "cam-streaming") else {}
    return hold_options(
        build_policy(KVPolicyConfig(policy=name, sink_tokens=SINKS, window_tokens=WINDOW, block_size=BLOCK,
                                    **cfg, **extra))
    )  # fmt: skip


def _check_hold(extra, name="h2o", allow=True, prompt=100, pool=1000, **policy_extra):
    return check_request(
        extra, server_policy=name, allow_full=allow, num_tokens=prompt + 10, pool_tokens=pool,
        block_size=BLOCK, hold=_hold_options(name, **policy_extra), prompt_tokens=prompt,
    )  # fmt: skip


def test_a_request_may_hold_its_prompt_on_a_score_driven_server_that_allows_it():
    assert _hold_options("h2o") == (True, False, False)
    assert _hold_options("h2o", prompt_hold=True) == (True, True, False)
    assert _hold_options("snapkv") == (False, True, False)  # its score needs the hold
    assert _hold_options("streaming") == (False, False, False)
    assert _hold_options("h2o", prompt_hold=True, prompt_hold_tokens=160)[2]  # bounded
    assert _check_hold({"kv_prompt_hold": True}) is False  # accepted (not the full cache)
    assert _check_hold({"kv_prompt_hold": 1}) is False  # JSON true, as vLLM's schema passes it
    assert _check_hold({"kv_prompt_hold": False}) is False  # what the server does anyway
    assert _check_hold({"kv_prompt_hold": False}, prompt_hold=True) is False  # declines the server's
    assert _check_hold({"kv_prompt_hold": True}, name="snapkv") is False  # snapkv holds anyway
    for extra, kwargs, message in (
        ({"kv_prompt_hold": 2}, {}, "must be true or false"),
        ({"kv_prompt_hold": 1.0}, {}, "must be true or false"),
        ({"kv_prompt_hold": "yes"}, {}, "must be true or false"),
        ({"kv_prompt_hold": True, "kv_policy": "none"}, {}, "contradict"),
        ({"kv_prompt_hold": True}, {"allow": False}, "not allowed by this server.*--kv-allow-full"),
        ({"kv_prompt_hold": True}, {"prompt": 990}, "needs 1006 KV tokens.*pool holds 1000"),
        ({"kv_prompt_hold": False}, {"name": "snapkv"}, "prompt's last queries"),
        ({"kv_prompt_hold": True}, {"name": "streaming"}, "chooses no heavy region"),
        ({"kv_prompt_hold": True}, {"name": "cam-streaming"}, "chooses no heavy region"),
        ({"kv_prompt_hold": False}, {"prompt_hold": True, "prompt_hold_tokens": 160}, "bounded"),
    ):
        with pytest.raises(ValueError, match=message):
            _check_hold(extra, **kwargs)


def test_a_requests_own_hold_is_read_alike_by_scheduler_and_workers():
    """``request_hold`` (scheduler and workers) says None for anything the API server refuses,
    and both sides register / plan the same rows."""
    from types import SimpleNamespace

    from cam_vllm.vllm_plugin import request_policy as rp
    from cam_vllm.vllm_plugin import step_requests
    from cam_vllm.vllm_plugin.process_state import ENGINE

    def params(**extra):
        return SimpleNamespace(extra_args=extra)

    h2o, held = _hold_options("h2o"), _hold_options("h2o", prompt_hold=True)
    assert rp.request_hold(params(kv_prompt_hold=True), h2o, True) is True
    assert rp.request_hold(params(kv_prompt_hold=True), h2o, False) is None  # not allowed: the policy's
    assert rp.request_hold(params(kv_prompt_hold=False), h2o, True) is None  # the policy's anyway
    assert rp.request_hold(params(kv_prompt_hold=False), held, False) is False  # declining needs no leave
    assert rp.request_hold(params(kv_prompt_hold=1), h2o, True) is True  # JSON true through vLLM
    for bad in (2, 1.0, "true", None):
        assert rp.request_hold(params(kv_prompt_hold=bad), h2o, True) is None
    assert rp.request_hold(params(kv_prompt_hold=True, kv_policy="none"), h2o, True) is None
    assert rp.request_hold(params(kv_prompt_hold=False), _hold_options("snapkv"), True) is None

    policy = build_policy(
        KVPolicyConfig(
            policy="h2o", sink_tokens=SINKS, window_tokens=WINDOW, heavy_tokens=32, block_size=BLOCK
        )
    )
    step_requests.publish(
        ["a", "b", "c"],
        [None] * 3,
        [300, 120, 1],
        [params(kv_prompt_hold=True), params(), None],
        [290, 100, 1],
    )
    step = step_requests.current(3, torch.tensor([300, 120, 1]))
    assert step_requests.holds_of(step, policy, allow=True).tolist() == [290, 0, 0]
    assert step_requests.holds_of(step, policy, allow=False) is None

    # the scheduler: registered where the prompt (and a block) fits, dropped where it cannot
    manager = SimpleNamespace(block_pool=SimpleNamespace(num_gpu_blocks=40))
    setattr_ = pytest.MonkeyPatch()
    setattr_.setattr(ENGINE, "block_size", 32)
    setattr_.setattr(ENGINE, "allows_full", True)
    setattr_.setattr(ENGINE, "hold", h2o)
    try:
        fits = SimpleNamespace(request_id="a", num_prompt_tokens=1000, max_tokens=5000,
                               sampling_params=params(kv_prompt_hold=True))  # fmt: skip
        too_long = SimpleNamespace(request_id="b", num_prompt_tokens=39 * 32, max_tokens=1,
                                   sampling_params=params(kv_prompt_hold=True))  # fmt: skip
        rp.on_allocate(manager, fits)
        rp.on_allocate(manager, too_long)
        assert ENGINE.request_holds == {"a": True}
        assert too_long.sampling_params.extra_args == {}  # what the workers will see: the policy's
    finally:
        rp.release_full("a")
        rp.release_full("b")
        setattr_.undo()
    assert not ENGINE.request_holds
