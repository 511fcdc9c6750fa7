"""Write a Qwen3-30B-A3B-shaped GGUF with random valid blocks in llama.cpp's Q4_K_M layout.

Real dimensions (REFERENCE.md §2): hidden 2048, 32 heads / 4 KV heads of 128, 128 experts top-8,
expert FFN 768, vocab 151936, rope 1e6. Q4_K everywhere except where llama.cpp's Q4_K_M recipe
puts Q6_K: `output`, and `attn_v` / `ffn_down_exps` on "use_more_bits" layers (first and last
eighth, and every third layer in between). Router F32, norms F32. No float weights are
materialised: tensors are generated and streamed to disk one at a time.

    python benchmarks/make_qwen3_30b.py /tmp/qwen3-30b-a3b-q4km.gguf            # 48 layers, ~18.5 GB
    python benchmarks/make_qwen3_30b.py /tmp/qwen3-30b-a3b-4l.gguf --layers 4   # quick runs
"""

from __future__ import annotations

import argparse

from gguf import GGMLQuantizationType as QT

from moeserve.testing import ModelSpec, write_model


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers get Q6_K attn_v / ffn_down in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def qwen3_30b_spec(n_layers: int = 48, seed: int = 0) -> ModelSpec:
    qtypes = {"output.weight": QT.Q6_K, "*ffn_gate_inp.weight": QT.F32}
    for i in range(n_layers):
        if use_more_bits(i, n_layers):
            qtypes[f"blk.{i}.attn_v.weight"] = QT.Q6_K
            qtypes[f"blk.{i}.ffn_down_exps.weight"] = QT.Q6_K
    return ModelSpec(arch="qwen3moe", vocab_size=151936, hidden_size=2048, n_layers=n_layers, n_heads=32,
                     n_kv_heads=4, head_dim=128, n_experts=128, n_experts_used=8, expert_ffn=768, ffn=6144,
                     tied=False, qtype=QT.Q4_K, qtypes=qtypes, context_length=40960, rope_theta=1e6, rms_eps=1e-6,
                     seed=seed, embed_scale=0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_model(args.path, qwen3_30b_spec(args.layers, args.seed), progress=True)


if __name__ == "__main__":
    main()
