"""Reentrancy: two threads call `LLM.logits` on the same model while the server's engine thread serves.

Kernel objects hold only what load gave them (no per-call state, fixed RoPE tables), and `logits`
touches no KV cache, so the three threads share one model safely and every result equals the one
computed alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from gguf import GGMLQuantizationType as QT

from moeserve import LLM, SamplingParams
from moeserve.server.app import create_app

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [1, 2, 3], list(range(40, 80)), [300, 301]]
REQUESTS = [[11, 12, 13, 14], [200, 100, 50], list(range(20, 45))]


@pytest.fixture(scope="module")
def native_moe(make_model):
    """Shapes every native kernel takes (K % 256 == 0): q/k/v + RoPE, integer dots/GEMM, fused MoE, dequant rows."""
    return make_model("reentrant-q4km", n_layers=2, hidden_size=256, head_dim=64, n_heads=4, n_kv_heads=2,
                      n_experts=8, n_experts_used=2, expert_ffn=256, vocab_size=512, qtype=QT.Q4_K,
                      qtypes={"*attn_v*": QT.Q6_K, "*down_exps*": QT.Q6_K, "*ffn_gate_inp*": QT.F32,
                              "token_embd.weight": QT.Q8_0})


@pytest.mark.parametrize("kernels, model", [("cpu", "native_moe"), ("cpu", "tiny_moe"), ("reference", "tiny_moe")])
def test_two_threads_call_logits_while_the_server_runs(request, kernels, model):
    llm = LLM(str(request.getfixturevalue(model)), kernels=kernels, max_model_len=256)
    expected = [llm.logits(p) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([r], greedy)[0].outputs[0] for r in REQUESTS]

    errors: list[str] = []
    stop = threading.Event()
    calls = [0, 0]

    def worker(w: int) -> None:
        i = w
        while not stop.is_set() or calls[w] < 10:
            p = i % len(PROMPTS)
            got = llm.logits(PROMPTS[p])
            scale = np.abs(expected[p]).max()
            if got.shape != expected[p].shape or np.abs(got - expected[p]).max() > 1e-5 * scale:
                errors.append(f"thread {w} prompt {p}: max |Δ| {np.abs(got - expected[p]).max():.3e}")
            calls[w] += 1
            i += 1

    with TestClient(create_app(llm, "tiny")) as client:  # the lifespan starts the engine thread
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(2)]
        for t in threads:
            t.start()
        try:
            for _ in range(2):
                for r, want in zip(REQUESTS, alone, strict=True):
                    resp = client.post("/v1/completions", json={"model": "tiny", "prompt": r, "max_tokens": 12,
                                                                "temperature": 0.0, "ignore_eos": True})
                    assert resp.status_code == 200, resp.text
                    body = resp.json()
                    assert body["usage"]["completion_tokens"] == len(want.token_ids)
                    assert body["choices"][0]["text"] == want.text
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:5]
    assert min(calls) >= 10
    # the engine is unharmed: the same requests, alone again, give the same tokens
    assert [llm.generate([r], greedy)[0].outputs[0].token_ids for r in REQUESTS] == [a.token_ids for a in alone]
