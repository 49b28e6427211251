"""Scheduler side without an engine: the block layout's arithmetic against the policy, and the policy manager
driven by vLLM's real ``KVCacheManager.allocate_slots`` (which decides when frees happen)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from cam_vllm.policies import StreamingPolicy  # noqa: E402
from cam_vllm.vllm_plugin.kv_manager import (  # noqa: E402
    PolicyAttentionSpec,
    PolicyKVCacheManager,
    policy_kv_spec,
    register_kv_spec,
)

B = 32


def _policy(sinks: int = 4, window: int = 64, block: int = B) -> StreamingPolicy:
    return StreamingPolicy(block_size=block, sink_tokens=sinks, window_tokens=window)


@pytest.mark.parametrize(
    "sinks,window,block", [(4, 64, 32), (0, 32, 32), (32, 96, 32), (40, 128, 16), (1, 4, 1)]
)
def test_freeable_blocks_match_policy_retained(sinks: int, window: int, block: int) -> None:
    """A block is freeable exactly when none of its positions is retained for n = processed + 1."""
    policy = _policy(sinks, window, block)
    for processed in range(0, 12 * block + 3):
        n = processed + 1
        num_blocks = -(-n // block)
        pos = torch.arange(num_blocks * block)
        kept = policy.retained(pos, n).view(num_blocks, block).any(dim=1)
        first, last = policy.layout.freeable(processed)
        expected = [i for i in range(num_blocks) if not kept[i]]
        assert list(range(first, max(first, last))) == expected, (processed, first, last, expected)


@pytest.mark.parametrize("sinks,window,block", [(4, 98, 32), (4, 61, 32), (0, 32, 32), (40, 130, 16)])
def test_token_exact_policies_free_a_block_once_its_last_token_is_hidden(sinks, window, block) -> None:
    """Token-exact: a block is freeable exactly when none of its tokens is visible any more
    (the per-token window), and what is held never exceeds the spec's bound."""
    from cam_vllm.policies import KVPolicy

    policy = StreamingPolicy(block_size=block, sink_tokens=sinks, window_tokens=window, token_exact=True)
    spec = policy_kv_spec(_full_attention_spec(block), KVPolicy(policy, None, name="streaming"))
    assert (spec.sink_end, spec.window_tokens, spec.exact_window) == (
        policy.block_prefix_end,
        policy.block_window_tokens,
        window,
    )
    for processed in range(0, 12 * block + 3):
        n = processed + 1
        num_blocks = -(-n // block)
        pos = torch.arange(num_blocks * block)
        kept = policy.retained(pos, n).view(num_blocks, block).any(dim=1)
        first, last = spec.layout.freeable(processed)
        assert list(range(first, max(first, last))) == [i for i in range(num_blocks) if not kept[i]], (
            processed
        )
        held = num_blocks - max(last - first, 0)
        assert held <= (spec.sink_end + spec.window_tokens) // block


def _full_attention_spec(block: int = B):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=block, num_kv_heads=2, head_size=32, dtype=torch.float32)


def _policy_spec(sinks: int = 4, window: int = 64, step: int = 32) -> PolicyAttentionSpec:
    from cam_vllm.policies import KVPolicy

    spec = policy_kv_spec(_full_attention_spec(), KVPolicy(_policy(sinks, window), None, name="streaming"))
    from dataclasses import replace

    return replace(spec, step_tokens=step)


def test_spec_fields_merge_and_prefix_caching() -> None:
    spec = _policy_spec()
    assert isinstance(spec, PolicyAttentionSpec)
    assert (spec.sink_end, spec.window_tokens, spec.policy_name) == (32, 64, "streaming")
    assert spec.prefix_cacheable is False
    merged = PolicyAttentionSpec.merge([spec, spec])
    assert merged == spec and type(merged) is PolicyAttentionSpec
    other = _policy_spec(window=96)
    with pytest.raises(AssertionError):
        PolicyAttentionSpec.merge([spec, other])
    assert policy_kv_spec(_full_attention_spec(), None) == _full_attention_spec()


def test_policy_kv_spec_refuses_sliding_window() -> None:
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    from cam_vllm.policies import KVPolicy
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError

    sw = SlidingWindowSpec(block_size=B, num_kv_heads=2, head_size=32, dtype=torch.float32, sliding_window=64)
    with pytest.raises(KVPolicyStartupError, match="plain full attention"):
        policy_kv_spec(sw, KVPolicy(_policy(), None, name="streaming"))


@pytest.fixture(autouse=True)
def _private_stats(monkeypatch):
    """Managers made here record into their own stats: requests these tests leave unfreed must
    not show up in this process's metrics file (which an engine started later could read)."""
    from cam_vllm.vllm_plugin import metrics

    monkeypatch.setattr(metrics, "STATS", metrics.ProcessStats())


def _manager_and_pool(spec: PolicyAttentionSpec, num_blocks: int, enable_caching: bool = False):
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    register_kv_spec()
    config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)]
    )
    kvm = KVCacheManager(
        config,
        max_model_len=1 << 16,
        scheduler_block_size=B,
        hash_block_size=B,
        max_in_flight_tokens=spec.step_tokens,
        enable_caching=enable_caching,
    )
    manager = kvm.coordinator.single_type_managers[0]
    assert isinstance(manager, PolicyKVCacheManager)
    return kvm, manager


def _request(rid: str, prompt_len: int):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(rid, list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=1 << 14), None)


def _run(kvm, req, chunk: int, steps_after_prompt: int):
    """Schedule ``req`` like vLLM does (prefill in chunks, then decode), yield held blocks."""
    manager = kvm.coordinator.single_type_managers[0]
    prompt = req.num_prompt_tokens
    while req.num_computed_tokens < prompt:
        n = min(chunk, prompt - req.num_computed_tokens)
        assert kvm.allocate_slots(req, n, full_sequence_must_fit=True) is not None
        yield req.num_computed_tokens, n, manager.req_to_blocks[req.request_id]
        req.num_computed_tokens += n
    for _ in range(steps_after_prompt):
        req.append_output_token_ids(7)
        assert kvm.allocate_slots(req, 1) is not None
        yield req.num_computed_tokens, 1, manager.req_to_blocks[req.request_id]
        req.num_computed_tokens += 1


@pytest.mark.parametrize("chunk", [32, 45, 100])
@pytest.mark.parametrize("prompt_len", [10, 97, 500])
def test_manager_frees_exactly_the_dropped_blocks(chunk: int, prompt_len: int) -> None:
    spec = _policy_spec(step=chunk)
    policy = _policy()
    kvm, manager = _manager_and_pool(spec, num_blocks=64)
    req = _request("a", prompt_len)
    total = kvm.block_pool.get_num_free_blocks()
    bound = policy.layout.max_blocks(chunk, 1 << 30)
    peak = 0
    for computed, n, blocks in _run(kvm, req, chunk, steps_after_prompt=300):
        live = [i for i, blk in enumerate(blocks) if not blk.is_null]
        # every block the next queries (computed .. computed + n - 1) read is still there
        for q in range(computed, computed + n):
            needed = torch.nonzero(policy.retained(torch.arange(q + 1), q + 1)).flatten() // B
            assert set(needed.tolist()) <= set(live), (computed, q)
        # nothing outside retained(., computed + 1) is held, except this step's new blocks
        retained_now = policy.retained(torch.arange(len(blocks) * B), computed + 1).view(-1, B).any(1)
        new_from = computed // B
        assert all(retained_now[i] or i >= new_from for i in live), (computed, live)
        held = total - kvm.block_pool.get_num_free_blocks()
        assert held == len(live)
        peak = max(peak, held)
    assert peak <= bound
    kvm.free(req)
    assert kvm.block_pool.get_num_free_blocks() == total


def test_running_gauges_follow_the_requests_the_manager_holds() -> None:
    """Per-request lengths feed the running gauges; freeing a request (``free``, or the
    scheduler's deferred ``pop_blocks_for_free``) observes it once and the gauges go to zero."""
    from cam_vllm.vllm_plugin import metrics

    stats = metrics.STATS  # this test's own (see _private_stats)
    kvm, manager = _manager_and_pool(_policy_spec(step=32), num_blocks=64)
    a, b = _request("a", 300), _request("b", 200)
    list(_run(kvm, a, 32, steps_after_prompt=3))
    list(_run(kvm, b, 32, steps_after_prompt=3))
    assert set(stats.running) == {"a", "b"}
    assert stats.snapshot()["gauges"]["kv_tokens_logical"] >= 500
    assert stats.snapshot()["gauges"]["requests_tracked"] == 2
    kvm.free(a)
    assert set(stats.running) == {"b"} and stats.histograms["request_logical_tokens"][-1] >= 300
    kvm.block_pool.free_blocks(reversed(kvm.pop_blocks_for_free(b)))  # the deferred-free path
    assert stats.running == {} and stats.snapshot()["gauges"] == {
        "kv_tokens_logical": 0,
        "kv_tokens_retained": 0,
        "requests_tracked": 0,  # nothing left for the load test to find
    }
    assert sum(stats.histograms["request_logical_tokens"][:-1]) == 2  # each observed once


def test_admission_uses_the_policy_bound() -> None:
    """A prompt longer than the whole pool is admitted (its peak is sinks + window + a chunk)."""
    spec = _policy_spec(step=32)
    kvm, _ = _manager_and_pool(spec, num_blocks=8)  # 7 usable blocks, prompt needs 32
    req = _request("long", 1024)
    held = list(_run(kvm, req, 32, steps_after_prompt=10))
    assert held
    kvm.free(req)


def test_prefix_caching_never_shares_policy_blocks() -> None:
    """Even with vLLM's prefix caching on, a policy group hashes nothing and never hits."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(B, sha256)
    spec = _policy_spec(step=64)
    kvm, _ = _manager_and_pool(spec, num_blocks=64, enable_caching=True)
    prompt = list(range(3, 203))
    a = Request("a", prompt, SamplingParams(max_tokens=64), None, block_hasher=hasher)
    b = Request("b", prompt, SamplingParams(max_tokens=64), None, block_hasher=hasher)
    assert len(a.block_hashes) == 200 // B  # the same prompt hashes the same
    list(_run(kvm, a, 64, steps_after_prompt=5))
    _blocks, hit_tokens, *_ = kvm.get_computed_blocks(b)
    assert hit_tokens == 0


@pytest.mark.parametrize("hold_tokens", [0, 256, 384])
def test_a_held_prompt_frees_what_the_policy_stops_keeping_and_stays_within_the_spec(hold_tokens) -> None:
    """snapkv with a whole-prompt or bounded hold: the block manager frees exactly the blocks the
    policy's ``kept`` stops keeping, inside the prompt and after it; a bounded hold holds at most
    its size (the spec's admission cap, now per request again), a whole one the prompt."""
    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy

    extra = {"prompt_hold_tokens": hold_tokens} if hold_tokens else {}
    cfg = KVPolicyConfig(
        policy="snapkv", sink_tokens=4, heavy_tokens=64, window_tokens=96, block_size=B, **extra
    )
    policy = build_policy(cfg)
    ev = policy.eviction
    spec = policy_kv_spec(_full_attention_spec(), policy)
    assert (spec.prompt_hold, spec.hold_span) == (True, ev.hold_span)
    assert spec.holds_whole_prompts == (not hold_tokens)
    prompt = 700
    peak = 0
    for processed in range(0, prompt + 3 * B):
        n = processed + 1
        num_blocks = -(-n // B)
        pos = torch.arange(num_blocks * B)
        kept = ev.kept(pos, n, prompt).view(num_blocks, B).any(dim=1)
        first, last = spec.layout.freeable(processed, prompt)
        assert list(range(first, max(first, last))) == [i for i in range(num_blocks) if not kept[i]], (
            processed
        )
        peak = max(peak, num_blocks - max(last - first, 0))
    if hold_tokens:
        assert peak * B == hold_tokens
        assert spec.max_blocks(4096, step_tokens=1) == hold_tokens // B  # one token a step: the bound
    else:
        assert peak * B == -(-prompt // B) * B
        assert spec.max_blocks(4096) == 4096 // B
