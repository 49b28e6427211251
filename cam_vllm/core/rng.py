"""Counter-based random numbers for merge decisions.

A CaM draw is a function of *what* is decided, not of *when*: the uniform number for the
Bernoulli mask of evicted token ``position`` in ``layer`` and KV head ``head`` under ``seed`` is
``hash(seed, layer, position, head)``. The reference engine and the vLLM path therefore make the
same decisions whatever the batch composition, chunking, or number of tensor-parallel workers
(pass the *global* KV-head index), and a request's draws never depend on another request's.

The hash is the 32-bit "lowbias32" integer finaliser evaluated in int64 arithmetic (values are
kept below 2**32, so a product only wraps in bits that the mask discards). Triton kernels can
reproduce it with uint32 arithmetic.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x846CA68B
# Distinct odd constants that separate the fields of the key before they are mixed.
_LAYER_SALT = 0x9E3779B1
_HEAD_SALT = 0x85EBCA77
_CHOICE_SALT = 0xC2B2AE3D


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Mix each element (an int64 tensor holding values in [0, 2**32)) into 32 random bits."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _C1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _C2) & _MASK32
    x = x ^ (x >> 16)
    return x


def _key(seed: int, layer: int, positions: torch.Tensor, heads: torch.Tensor, salt: int) -> torch.Tensor:
    """Hash of (seed, layer, position, head, salt) for every (position, head) pair: [E, H] int64.

    ``positions`` [E] is shared by the heads; [E, H] gives each head its own (score-driven
    policies evict different tokens per KV head)."""
    base = hash32(torch.tensor((seed & _MASK32) ^ salt, dtype=torch.int64))
    base = hash32(base ^ ((layer * _LAYER_SALT) & _MASK32))
    pos = positions.to(torch.int64)
    pos = pos if pos.dim() == 2 else pos.reshape(-1, 1)
    head = heads.to(device=pos.device, dtype=torch.int64).reshape(1, -1)
    h = hash32(base.to(pos.device) ^ hash32(pos))
    return hash32(h ^ hash32((head * _HEAD_SALT) & _MASK32))


def merge_uniforms(seed: int, layer: int, positions: torch.Tensor, heads: torch.Tensor | int) -> torch.Tensor:
    """Uniform numbers in [0, 1) for the merge mask, shape [len(positions), num_heads], float32.

    ``heads`` is either the number of KV heads (heads 0..n-1) or a tensor of global head indices.
    """
    if isinstance(heads, int):
        heads = torch.arange(heads, device=positions.device)
    bits = _key(seed, layer, positions, heads, salt=0)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def target_choices(
    seed: int,
    layer: int,
    positions: torch.Tensor,
    heads: torch.Tensor | int,
    num_targets: int | torch.Tensor,
) -> torch.Tensor:
    """Index in [0, num_targets) of a single merge target per (position, head), shape [E, H] int64.

    Used only by the "random single target" ablation of the paper (Table 2, w.o. Avg Merge).
    """
    if isinstance(heads, int):
        heads = torch.arange(heads, device=positions.device)
    bits = _key(seed, layer, positions, heads, salt=_CHOICE_SALT)
    if isinstance(num_targets, torch.Tensor):  # per position ([E, 1]), e.g. a chain's counts
        return bits % num_targets.to(bits.device).clamp(min=1)
    return bits % max(num_targets, 1)
