"""Write a Qwen3-30B-A3B-shaped GGUF with random valid blocks in llama.cpp's Q4_K_M layout (or Q3_K_M, Q2_K, IQ4_XS).

Real dimensions (REFERENCE.md §2): hidden 2048, 32 heads / 4 KV heads of 128, 128 experts top-8,
expert FFN 768, vocab 151936, rope 1e6. Q4_K everywhere except where llama.cpp's Q4_K_M recipe
puts Q6_K: `output`, and `attn_v` / `ffn_down_exps` on "use_more_bits" layers (first and last
eighth, and every third layer in between). Router F32, norms F32. No float weights are
materialised: tensors are generated and streamed to disk one at a time.

`--mix q3_k_m` and `--mix q2_k` follow llama.cpp's recipes of those names for a model of this shape: Q3_K_M is
Q3_K with Q4_K attn_output, attn_v Q5_K on the first two layers and Q4_K after, ffn_down_exps Q5_K on the first
sixteenth and Q4_K after; Q2_K is Q2_K with Q3_K attn_output / ffn_down_exps and Q4_K attn_v. `--mix iq4_xs` is
IQ4_XS with Q5_K attn_v (4+ query heads per KV head) and Q5_K ffn_down_exps on the first eighth of the layers (a file
quantized without an importance matrix). `output` is Q6_K in all four.

    python benchmarks/make_qwen3_30b.py /tmp/qwen3-30b-a3b-q4km.gguf            # 48 layers, ~18.5 GB
    python benchmarks/make_qwen3_30b.py /tmp/qwen3-30b-a3b-4l.gguf --layers 4   # quick runs
    python benchmarks/make_qwen3_30b.py /tmp/q3km-4l.gguf --layers 4 --mix q3_k_m
"""

from __future__ import annotations

import argparse

from gguf import GGMLQuantizationType as QT

from moeserve.testing import ModelSpec, write_model


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers get Q6_K attn_v / ffn_down in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


MIXES = ("q4_k_m", "q3_k_m", "q2_k", "iq4_xs")


def mix_qtypes(mix: str, n_layers: int) -> tuple[QT, dict[str, QT]]:
    """The base type and the per-tensor exceptions of llama.cpp's recipe `mix` (module docstring)."""
    qtypes = {"output.weight": QT.Q6_K, "*ffn_gate_inp.weight": QT.F32}
    if mix == "q4_k_m":
        for i in range(n_layers):
            if use_more_bits(i, n_layers):
                qtypes[f"blk.{i}.attn_v.weight"] = QT.Q6_K
                qtypes[f"blk.{i}.ffn_down_exps.weight"] = QT.Q6_K
        return QT.Q4_K, qtypes
    if mix == "q3_k_m":
        qtypes["*attn_output.weight"] = QT.Q4_K
        for i in range(n_layers):
            qtypes[f"blk.{i}.attn_v.weight"] = QT.Q5_K if i < 2 else QT.Q4_K
            qtypes[f"blk.{i}.ffn_down_exps.weight"] = QT.Q5_K if i < max(1, n_layers // 16) else QT.Q4_K
        return QT.Q3_K, qtypes
    if mix == "q2_k":
        qtypes |= {"*attn_output.weight": QT.Q3_K, "*ffn_down_exps.weight": QT.Q3_K, "*attn_v.weight": QT.Q4_K}
        return QT.Q2_K, qtypes
    if mix == "iq4_xs":
        qtypes["*attn_v.weight"] = QT.Q5_K
        for i in range(n_layers // 8):
            qtypes[f"blk.{i}.ffn_down_exps.weight"] = QT.Q5_K
        return QT.IQ4_XS, qtypes
    raise ValueError(f"unknown mix {mix!r} (one of {', '.join(MIXES)})")


def qwen3_30b_spec(n_layers: int = 48, seed: int = 0, mix: str = "q4_k_m") -> ModelSpec:
    qtype, qtypes = mix_qtypes(mix, n_layers)
    return ModelSpec(arch="qwen3moe", vocab_size=151936, hidden_size=2048, n_layers=n_layers, n_heads=32,
                     n_kv_heads=4, head_dim=128, n_experts=128, n_experts_used=8, expert_ffn=768, ffn=6144,
                     tied=False, qtype=qtype, qtypes=qtypes, context_length=40960, rope_theta=1e6, rms_eps=1e-6,
                     seed=seed, embed_scale=0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", choices=MIXES, default="q4_k_m", help="llama.cpp's quantization recipe (docstring)")
    args = ap.parse_args()
    write_model(args.path, qwen3_30b_spec(args.layers, args.seed, args.mix), progress=True)


if __name__ == "__main__":
    main()
