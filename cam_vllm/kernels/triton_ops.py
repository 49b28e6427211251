"""Triton kernels of the CUDA path: decode scores into ``Abar``, and CaM's chain merge of values.

Each replaces a few dozen small torch ops per layer with one launch and computes the same numbers
as the torch code it stands for (both are tested against it on the CPU under
``TRITON_INTERPRET=1``, ``tests/test_triton_kernels.py``):

* :func:`decode_scores` - ``scoring._score_decodes`` for accumulated attention: per (request, KV
  head) program, the request's queries (``S`` steps x ``G`` query heads) against its retained
  blocks read in place from the paged key cache (any strides: the NHD view FlashAttention uses),
  a two-pass softmax per query, the mean over each KV head's query heads, summed over the steps
  and added atomically to ``Abar`` by physical slot. No gathered copy of the keys, no
  ``[R, H, S, G, N]`` probability tensor.
* :func:`chain_merge_values` - the triangular solve at the end of ``core.merge.cam_merge`` (even
  targets): per (chain, head) program a forward sweep over the chain, each entry receiving from
  the merged sources before it within ``m`` entries, in order, as tokens leaving one by one would.

Only imported where Triton is installed; ``available()`` says whether these may run here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET_ENV = "TRITON_INTERPRET"


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``'s device: CUDA, or any device under the interpreter."""
    return t.is_cuda or os.environ.get(INTERPRET_ENV) == "1"


@triton.jit
def _block_logits(
    q, k_ptr, blocks_ptr, valid_ptr, r, h, j, s, row_ok, t, dd,
    num_blocks_row, stride_kb, stride_kt, stride_kh, scale,
    S: tl.constexpr, B: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    """Scaled logits of the queries against retained block ``j`` of request ``r``, -inf where hidden."""
    blk = tl.load(blocks_ptr + r * num_blocks_row + j)
    k = tl.load(
        k_ptr + blk * stride_kb + t[:, None] * stride_kt + h * stride_kh + dd[None, :],
        mask=dd[None, :] < D,
        other=0.0,
    ).to(tl.float32)
    valid = valid_ptr + (r * S + s)[:, None] * (num_blocks_row * B) + j * B + t[None, :]
    ok = tl.load(valid, mask=row_ok[:, None], other=0)
    logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return tl.where(ok != 0, logits, float("-inf"))


@triton.jit
def _decode_scores_kernel(
    q_ptr, k_ptr, blocks_ptr, valid_ptr, slots_ptr, abar_ptr,
    stride_qr, stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    num_blocks_row, num_kv_heads, scale,
    S: tl.constexpr, G: tl.constexpr, B: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    s, g = m // G, m % G
    row_ok = m < S * G
    dd = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + r * stride_qr + s[:, None] * stride_qs + (h * G + g)[:, None] * stride_qh + dd[None, :],
        mask=row_ok[:, None] & (dd[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    t = tl.arange(0, B)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for j in range(num_blocks_row):  # pass 1: each query's max and sum, online
        logits = _block_logits(
            q, k_ptr, blocks_ptr, valid_ptr, r, h, j, s, row_ok, t, dd,
            num_blocks_row, stride_kb, stride_kt, stride_kh, scale, S, B, D,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_i = m_new
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv = (
        tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0) / G
    )  # the mean over each KV head's G query heads
    for j in range(num_blocks_row):  # pass 2: probabilities, summed per key, added to Abar
        logits = _block_logits(
            q, k_ptr, blocks_ptr, valid_ptr, r, h, j, s, row_ok, t, dd,
            num_blocks_row, stride_kb, stride_kt, stride_kh, scale, S, B, D,
        )  # fmt: skip
        col = tl.sum(tl.exp(logits - m_safe[:, None]) * inv[:, None], axis=0)  # [B]
        slot = tl.load(slots_ptr + r * (num_blocks_row * B) + j * B + t)
        tl.atomic_add(abar_ptr + slot * num_kv_heads + h, col)


def decode_scores(
    q: torch.Tensor,
    k_view: torch.Tensor,
    blocks: torch.Tensor,
    valid: torch.Tensor,
    slots: torch.Tensor,
    abar: torch.Tensor,
    scale: float,
) -> None:
    """Add the decode queries' accumulated attention to ``abar`` in place.

    q [R, S, Hq, D] (query ``s`` of request ``r``; padding queries see nothing in ``valid``);
    k_view [num_blocks, B, Hkv, D], any strides (the last one 1); blocks [R, nb] retained blocks;
    valid [R, S, nb * B] bool; slots [R, nb * B] physical slots; abar [num_slots, Hkv] float32,
    contiguous. The same result as ``scoring._score_decodes`` without score fields.
    """
    r, s, hq, d = q.shape
    _, b, hkv, _ = k_view.shape
    nb = blocks.shape[1]
    if r == 0 or nb == 0:
        return
    assert k_view.stride(3) == 1 and abar.is_contiguous() and abar.dtype == torch.float32
    q = q.contiguous()
    g = hq // hkv
    block_m = max(16, triton.next_power_of_2(s * g))
    _decode_scores_kernel[(r, hkv)](
        q, k_view, blocks.to(torch.int64).contiguous(), valid.to(torch.int8).contiguous(),
        slots.to(torch.int64).contiguous(), abar,
        q.stride(0), q.stride(1), q.stride(2),
        k_view.stride(0), k_view.stride(1), k_view.stride(2),
        nb, hkv, float(scale),
        S=s, G=g, B=b, D=d, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip


@triton.jit
def _chain_merge_kernel(
    x_ptr, w_ptr, count_ptr, n, num_targets,
    stride_xh, stride_xn, stride_wn, stride_wh,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    base = x_ptr + h * stride_xh
    for i in range(1, n):  # entry i receives from the (already merged) sources j in [i - m, i)
        acc = tl.load(base + i * stride_xn + dd, mask=dm, other=0.0)
        lo = tl.maximum(i - num_targets, 0)
        for j in range(lo, i):
            c = tl.load(count_ptr + j)
            w = tl.load(w_ptr + j * stride_wn + h * stride_wh)
            w = tl.where(j + c >= i, w, 0.0)
            acc += w * tl.load(base + j * stride_xn + dd, mask=dm, other=0.0)
        tl.store(base + i * stride_xn + dd, acc, mask=dm)


def chain_merge_values(
    x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor, num_targets: int
) -> None:
    """CaM's chain merge in place: x [H, N, D] (float32, in position order), weights [N, H] (the
    share a merging source gives each of its targets, 0 where nothing merges), counts [N] (targets
    of each source: the ``c`` entries after it). Entry ``i`` ends as ``x_i`` plus ``w_j x_j`` of
    every source ``j < i <= j + c_j``, ``x_j`` already merged: the unit lower-triangular solve of
    ``cam_merge`` for even targets."""
    h, n, d = x.shape
    if n < 2 or h == 0:
        return
    assert x.dtype == torch.float32 and x.stride(2) == 1
    weights = weights.to(torch.float32)
    _chain_merge_kernel[(h,)](
        x, weights, counts.to(torch.int64).contiguous(), n, int(num_targets),
        x.stride(0), x.stride(1), weights.stride(0), weights.stride(1),
        D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip


def chain_kernel():
    """The chain merge as ``core.merge.ChainKernel`` (``core.merge.use_chain_kernel`` installs it)."""
    from cam_vllm.core.merge import ChainKernel

    return ChainKernel(run=chain_merge_values, available=available)
