"""Tiny random Hugging Face Llamas for the reference and evaluation tests (no downloads)."""

from __future__ import annotations

import torch


def tiny_hf_llama(sharpen: bool = False, **config):
    """A seeded random ``LlamaForCausalLM`` in eval mode with ``config`` (vocabulary, sizes, heads).

    ``sharpen`` scales the value and query projections (8x, 4x): larger values and sharper
    attention than the init, so that CaM's merges visibly matter.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    if sharpen:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.weight.mul_(8.0)
                layer.self_attn.q_proj.weight.mul_(4.0)
    return model
