"""Worker-side state of each KV policy as a share of the KV bytes it describes, per model.

    python scripts/state_overhead.py                       # well-known model shapes
    python scripts/state_overhead.py --model PATH [...]    # shapes read from config.json

Two kinds of state live next to vLLM's KV cache in the workers (docs/vllm-worker.md):

- per slot and KV head (``scoring.slot_state_bytes``, the tensors ``_bind`` allocates): ``Abar``
  (float32) for every policy that tracks scores, ``pos`` (int32) and the score's fields for the
  score-driven ones. Its share of the KV is ``bytes / (2 * head_dim * kv_dtype_bytes)``, the same
  for every token, so it depends on the model only through head_dim.
- per decoding request and layer, the deferred-scoring stash (``query_stash``): ``length`` queries
  of ``Hq x head_dim`` in the model dtype. Its share of the request's KV is
  ``length * Hq / (2 * Hkv * kept_tokens)``: large for small budgets on models with many query
  heads per KV head. Printed for the kept-token counts given by ``--kept``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (layers, query heads, KV heads, head_dim) of public checkpoints, from their config.json
KNOWN = {
    "SmolLM2-135M": (30, 9, 3, 64),
    "SmolLM2-360M": (32, 15, 5, 64),
    "Qwen2.5-0.5B": (24, 14, 2, 64),
    "Llama-3.1-8B": (32, 32, 8, 128),
    "Mistral-7B-v0.3": (32, 32, 8, 128),
    "Qwen2.5-7B": (28, 28, 4, 128),
}
POLICIES = ["streaming", "cam-streaming", "h2o", "tova", "scissorhands", "corm", "cam-h2o", "weighted-h2o"]


def shape_of(model_dir: Path) -> tuple[int, int, int, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    hq = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // hq
    return cfg["num_hidden_layers"], hq, cfg.get("num_key_value_heads", hq), head_dim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="checkpoint directory (repeatable)")
    ap.add_argument(
        "--kv-bytes", type=int, nargs="+", default=[2, 4], help="KV element bytes (bf16 2, fp32 4)"
    )
    ap.add_argument("--kept", type=int, nargs="+", default=[256, 1024, 4096], help="tokens a request keeps")
    args = ap.parse_args()

    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy
    from cam_vllm.vllm_plugin.query_stash import DEFAULT_STASH_LENGTH
    from cam_vllm.vllm_plugin.scoring import slot_state_bytes

    shapes = {Path(m).name: shape_of(Path(m)) for m in args.model} if args.model else KNOWN
    per_slot = {}
    for name in POLICIES:
        cfg = KVPolicyConfig(policy=name, sink_tokens=4, window_tokens=128)
        per_slot[name] = slot_state_bytes(build_policy(cfg))

    print("Per-slot state, bytes per slot and KV head:", ", ".join(f"{p} {b}" for p, b in per_slot.items()))
    print("\nPer-slot state as a share of the KV bytes it describes\n")
    cols = [f"{p} @ {b * 8}-bit KV" for b in args.kv_bytes for p in POLICIES if per_slot[p]]
    print("| model (head_dim) | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for model, (_, _, _, d) in shapes.items():
        cells = [f"{per_slot[p] / (2 * d * b):.1%}" for b in args.kv_bytes for p in POLICIES if per_slot[p]]
        print(f"| {model} ({d}) | " + " | ".join(cells) + " |")

    print(
        f"\nDeferred-scoring stash ({DEFAULT_STASH_LENGTH} queries per decoding request and layer, model"
        " dtype = KV dtype) as a share of the request's kept KV\n"
    )
    print("| model (Hq / Hkv) | " + " | ".join(f"{k} kept tokens" for k in args.kept) + " |")
    print("|---" * (len(args.kept) + 1) + "|")
    for model, (_, hq, hkv, _) in shapes.items():
        cells = [f"{DEFAULT_STASH_LENGTH * hq / (2 * hkv * k):.1%}" for k in args.kept]
        print(f"| {model} ({hq} / {hkv}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
