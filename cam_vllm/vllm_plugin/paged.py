"""Token access into vLLM's paged KV cache: the only place that knows the physical layout.

Two layouts, one interface (``gather_k`` / ``gather_v`` / ``scatter_v`` by slot): :class:`PagedKV`
for the CPU backend (described below) and :class:`NHDPagedKV` for CUDA FlashAttention (at the end).

vLLM's CPU backend (``CPU_ATTN``) keeps one tensor per layer, ``[num_blocks, num_kv_heads,
block_size, 2 * head_size]``. Per (block, KV head) the last two dimensions are only a size: they
hold ``block_size * head_size`` key elements followed by as many value elements, in an order that
depends on the ISA variant the backend picked (``_get_attn_isa``): ``vec``/``vec16`` store a block's
keys transposed (head_dim, token) and values token-major; ``amx`` packs both in VNNI tiles; other
variants are not documented. We never guess: :func:`probe_layout` writes known tokens through the
backend's own cache-update op (``cpu_attn_reshape_and_cache``) into a scratch cache and reads back
where every (token, dim) element of K and V landed. The result is an element-offset table inside a
(block, head) region, which :class:`PagedKV` uses to gather keys/values of any slots and to scatter
merged values back. A layout that is not a fixed permutation inside the region, or that does not
round-trip, raises at start-up instead of silently reading wrong numbers.

A *slot* is ``block_id * block_size + offset`` (vLLM's slot mapping); the token at position ``p`` of
a request lives at slot ``block_table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

# A dict kept with one set of slots for one step (``PagedKV._where``), or None.
Memo = dict[Any, Any] | None


class LayoutError(RuntimeError):
    """The CPU KV-cache layout is not what this module can read."""


@dataclass(frozen=True)
class KVLayout:
    """Where token ``t``, dim ``d`` of K and V sit inside one (block, KV head) region.

    k_offsets, v_offsets: [block_size, head_size] int64 element offsets into the region of
    ``2 * block_size * head_size`` elements.
    """

    isa: str
    block_size: int
    head_size: int
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor


def _write(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, isa: str) -> None:
    """Write k/v [N, H, D] at ``slots`` with the CPU backend's own op (the same call it makes)."""
    from vllm import _custom_ops as ops

    nb, h, b, _ = kv.shape
    key_cache, value_cache = kv.view(nb, h, 2 * b, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(
        k, v, key_cache, value_cache, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto"
    )


@functools.cache
def probe_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> KVLayout:
    """Find the K/V element layout of one (block, head) region by writing marked tokens.

    Three passes write, for every token of one block, a value that encodes the token index, the
    low and the high part of the dim index (each below 128, exact in bf16/fp16), then read back
    which element of the region holds which (token, dim) of K and of V.
    """
    b, d = block_size, head_size
    region = 2 * b * d
    kv = torch.zeros(1, 1, b, 2 * d, dtype=dtype)
    slots = torch.arange(b, dtype=torch.int64)
    tok = torch.arange(b).view(b, 1, 1).expand(b, 1, d)
    dim = torch.arange(d).view(1, 1, d).expand(b, 1, d)
    codes = (tok % 128, tok // 128, dim % 128, dim // 128)  # +1 below, so 0 means "not written"
    seen = []
    for code in codes:
        kv.zero_()
        val = (code + 1).to(dtype).contiguous()
        _write(kv, val, (-val).contiguous(), slots, isa)
        seen.append(kv.reshape(region).to(torch.float32).round().to(torch.int64))
    sign = torch.sign(seen[0])  # +1: a key element, -1: a value element, 0: never written
    if not bool((sign != 0).all()):
        raise LayoutError(f"CPU KV layout probe (isa={isa}): some cache elements were never written")
    t = (seen[0].abs() - 1) + 128 * (seen[1].abs() - 1)
    c = (seen[2].abs() - 1) + 128 * (seen[3].abs() - 1)
    offsets = torch.arange(region)
    k_off = torch.full((b, d), -1, dtype=torch.int64)
    v_off = torch.full((b, d), -1, dtype=torch.int64)
    is_k = sign > 0
    k_off[t[is_k], c[is_k]] = offsets[is_k]
    v_off[t[~is_k], c[~is_k]] = offsets[~is_k]
    if bool((k_off < 0).any()) or bool((v_off < 0).any()) or int(is_k.sum()) != b * d:
        raise LayoutError(f"CPU KV layout probe (isa={isa}): K/V are not a permutation of one region")
    layout = KVLayout(isa, b, d, k_off, v_off)
    _check_round_trip(layout, dtype)
    return layout


def _check_round_trip(layout: KVLayout, dtype: torch.dtype) -> None:
    """Random tokens written by the backend into several blocks/heads must gather back exactly."""
    b, d = layout.block_size, layout.head_size
    gen = torch.Generator().manual_seed(0)
    kv = torch.zeros(3, 2, b, 2 * d, dtype=dtype)
    slots = torch.tensor([0, b - 1, b + 1, 3 * b - 1, 2 * b + b // 2], dtype=torch.int64)
    k = torch.randn(len(slots), 2, d, generator=gen).to(dtype)
    v = torch.randn(len(slots), 2, d, generator=gen).to(dtype)
    _write(kv, k, v, slots, layout.isa)
    paged = PagedKV(kv, layout)
    if not (torch.equal(paged.gather_k(slots), k) and torch.equal(paged.gather_v(slots), v)):
        raise LayoutError(
            f"CPU KV layout (isa={layout.isa}, dtype={dtype}): tokens written by the backend do not "
            "read back; the layout differs per block or head and is not supported"
        )
    new_v = torch.randn(2, 2, d, generator=gen).to(dtype)
    paged.scatter_v(slots[:2], new_v)
    if not (torch.equal(paged.gather_v(slots[:2]), new_v) and torch.equal(paged.gather_k(slots), k)):
        raise LayoutError(f"CPU KV layout (isa={layout.isa}): writing values back failed")


def _affine(offsets: torch.Tensor) -> tuple[int, int, int] | None:
    """(base, token stride, dim stride) if ``offsets[t, d] == base + t * st + d * sd``, else None."""
    b, d = offsets.shape
    base = int(offsets[0, 0])
    st = int(offsets[1, 0]) - base if b > 1 else 0
    sd = int(offsets[0, 1]) - base if d > 1 else 0
    t, c = torch.meshgrid(torch.arange(b), torch.arange(d), indexing="ij")
    return (base, st, sd) if torch.equal(offsets, base + t * st + c * sd) else None


class PagedKV:
    """Gather/scatter tokens of one layer's CPU KV cache by slot (all KV heads at once).

    Strided layouts (``vec``/``vec16``: K transposed, V token-major) are read through a strided
    view of the cache (``[num_blocks, H, block_size, head_size]``), anything else (``amx``'s
    VNNI tiles) element by element through the probed offset table.
    """

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout):
        nb, h, b, two_d = kv_cache.shape
        if b != layout.block_size or two_d != 2 * layout.head_size:
            raise LayoutError(
                f"KV cache shape {tuple(kv_cache.shape)} does not match the probed layout "
                f"(block {layout.block_size}, head {layout.head_size})"
            )
        self.block_size = b
        self.num_heads = h
        self.flat = kv_cache.view(nb, h, b * two_d)  # one (block, head) region per row
        self.layout = layout
        self._heads = torch.arange(h).view(1, h, 1)
        self._k_view = self._strided(layout.k_offsets)
        self._k_transposed = _affine(layout.k_offsets) == (0, 1, b)  # vec / vec16: gather_block_kt
        self._v_view = self._strided(layout.v_offsets)

    def _strided(self, offsets: torch.Tensor) -> torch.Tensor | None:
        aff = _affine(offsets)
        if aff is None:
            return None
        base, st, sd = aff
        f = self.flat
        size = (f.shape[0], f.shape[1], self.block_size, self.layout.head_size)
        return f.as_strided(
            size,
            (f.stride(0), f.stride(1), st * f.stride(2), sd * f.stride(2)),
            f.storage_offset() + base * f.stride(2),
        )

    def _index(self, slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Linear element indices [N, H, D] of ``slots`` in ``flat`` (one ``take``/``put_`` reads
        or writes them: ~1.7x faster than indexing with three broadcast index tensors)."""
        region = self.flat.shape[2]
        block = (slots // self.block_size).view(-1, 1, 1) * (self.num_heads * region)
        return block + self._heads * region + offsets[slots % self.block_size].unsqueeze(1)

    def _where(
        self, slots: torch.Tensor, view: torch.Tensor | None, offsets: torch.Tensor, memo: Memo
    ) -> Any:
        """How to reach ``slots``: (block, token) for a strided ``view``, else the linear element
        indices of :meth:`_index`. With ``memo`` (a dict kept with one set of slots for one step),
        made once and reused by every layer of the step: the layers' caches share one shape and
        layout, and for the ``amx`` layout the indices cost as much as the read itself."""
        if memo is None:
            return self._make_where(slots, view, offsets)
        key = (view is not None, offsets.data_ptr(), tuple(self.flat.shape))
        got = memo.get(key)
        if got is None:
            got = memo[key] = self._make_where(slots, view, offsets)
        return got

    def _make_where(self, slots: torch.Tensor, view: torch.Tensor | None, offsets: torch.Tensor) -> Any:
        slots = slots.to(torch.int64)
        if view is not None:
            return slots // self.block_size, slots % self.block_size
        return self._index(slots, offsets)

    def _gather(
        self, slots: torch.Tensor, view: torch.Tensor | None, offsets: torch.Tensor, memo: Memo = None
    ) -> torch.Tensor:
        where = self._where(slots, view, offsets, memo)
        if view is not None:
            return view[where[0], :, where[1]]
        return torch.take(self.flat, where)

    def gather_k(self, slots: torch.Tensor, memo: Memo = None) -> torch.Tensor:
        """Keys of ``slots`` [N] as [N, H, D] (a copy). ``memo``: see :meth:`_where`."""
        return self._gather(slots, self._k_view, self.layout.k_offsets, memo)

    def gather_block_kt(self, blocks: torch.Tensor) -> torch.Tensor:
        """Transposed keys of whole blocks: ``blocks`` [R, nb] -> [R, nb, H, D, block_size].

        The decode scoring path reads every retained block of a request anyway. Where a block's
        keys are stored transposed (``vec``/``vec16``: element ``d * B + t``) this is one
        ``index_select`` of whole (block, head) rows, already laid out for ``q @ K^T`` block by
        block (no second copy into one [H, D, N] matrix); elsewhere slot by slot.
        """
        r, nb = blocks.shape
        b, d = self.block_size, self.layout.head_size
        if self._k_transposed:
            rows = self.flat[:, :, : b * d].index_select(0, blocks.flatten().to(torch.int64))
            return rows.view(r, nb, self.num_heads, d, b)
        slots = (blocks.to(torch.int64)[:, :, None] * b + torch.arange(b)).flatten()
        k = self.gather_k(slots).view(r, nb, b, self.num_heads, d)
        return k.permute(0, 1, 3, 4, 2)

    def gather_v(self, slots: torch.Tensor, memo: Memo = None) -> torch.Tensor:
        """Values of ``slots`` [N] as [N, H, D] (a copy). ``memo``: see :meth:`_where`."""
        return self._gather(slots, self._v_view, self.layout.v_offsets, memo)

    def _scatter(
        self,
        slots: torch.Tensor,
        x: torch.Tensor,
        view: torch.Tensor | None,
        offsets: torch.Tensor,
        memo: Memo,
    ) -> None:
        where = self._where(slots, view, offsets, memo)
        x = x.to(self.flat.dtype)
        if view is not None:
            view[where[0], :, where[1]] = x
        else:
            self.flat.put_(where, x)

    def scatter_v(self, slots: torch.Tensor, values: torch.Tensor, memo: Memo = None) -> None:
        """Write values [N, H, D] to ``slots`` in place (slots must be distinct)."""
        self._scatter(slots, values, self._v_view, self.layout.v_offsets, memo)

    def scatter_k(self, slots: torch.Tensor, keys: torch.Tensor, memo: Memo = None) -> None:
        """Write keys [N, H, D] to ``slots`` in place (merge rules that merge keys)."""
        self._scatter(slots, keys, self._k_view, self.layout.k_offsets, memo)


class NHDPagedKV:
    """Gather/scatter tokens of one layer's CUDA KV cache by slot; same interface as :class:`PagedKV`.

    vLLM 0.32 hands every attention layer a *logical* 4-D view ``[num_blocks, num_kv_heads,
    block_size, head_size + head_size_v]`` of its cache (``create_kv_cache_views``): per (block,
    head, token) the key's ``head_size`` elements, then the value's. The physical order is a stride
    permutation picked per model (``KVCacheLayout``: ``LBNHC`` = FlashAttention's NHD, the
    default, i.e. ``[num_blocks, block_size, num_kv_heads, 2 * head_size]`` in memory; ``LBHNC`` =
    HND; block-outer variants). FlashAttention itself reads the cache as
    ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``, i.e. ``[num_blocks, block_size,
    num_kv_heads, head_size]`` key and value views with whatever strides the layout gives; this
    class indexes exactly those views, so it is right for every layout the kernel is right for,
    without knowing which one was picked. Nothing is probed: unlike the CPU cache, elements are
    never reordered inside a (block, head) region.
    """

    def __init__(self, kv_cache: torch.Tensor, head_size: int, head_size_v: int | None = None):
        head_size_v = head_size if head_size_v is None else head_size_v
        if kv_cache.dim() != 4 or kv_cache.shape[3] != head_size + head_size_v:
            raise LayoutError(
                f"CUDA KV cache view {tuple(kv_cache.shape)} is not [num_blocks, num_kv_heads, "
                f"block_size, {head_size} + {head_size_v}]"
            )
        _, h, b, _ = kv_cache.shape
        self.block_size = b
        self.num_heads = h
        tokens = kv_cache.transpose(1, 2)  # [num_blocks, block_size, H, K | V], a view
        self._k = tokens[..., :head_size]
        self._v = tokens[..., head_size:]

    def _where(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = slots.to(device=self._k.device, dtype=torch.int64)
        return slots // self.block_size, slots % self.block_size

    def gather_k(self, slots: torch.Tensor, memo: Memo = None) -> torch.Tensor:
        """Keys of ``slots`` [N] as [N, H, D] (a copy); ``memo`` is not needed here (plain indexing)."""
        return self._k[self._where(slots)]

    def gather_v(self, slots: torch.Tensor, memo: Memo = None) -> torch.Tensor:
        """Values of ``slots`` [N] as [N, H, Dv] (a copy)."""
        return self._v[self._where(slots)]

    def gather_block_kt(self, blocks: torch.Tensor) -> torch.Tensor:
        """Transposed keys of whole blocks: ``blocks`` [R, nb] -> [R, nb, H, D, block_size]."""
        return self._k[blocks.to(device=self._k.device, dtype=torch.int64)].permute(0, 1, 3, 4, 2)

    @property
    def key_view(self) -> torch.Tensor:
        """The keys as ``[num_blocks, block_size, H, D]`` (a view; the Triton kernels read it)."""
        return self._k

    def scatter_v(self, slots: torch.Tensor, values: torch.Tensor, memo: Memo = None) -> None:
        """Write values [N, H, Dv] to ``slots`` in place (slots must be distinct)."""
        self._v[self._where(slots)] = values.to(self._v.dtype)

    def scatter_k(self, slots: torch.Tensor, keys: torch.Tensor, memo: Memo = None) -> None:
        """Write keys [N, H, D] to ``slots`` in place (merge rules that merge keys)."""
        self._k[self._where(slots)] = keys.to(self._k.dtype)
