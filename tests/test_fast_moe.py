"""Fused native decode MoE (moeserve.kernels.fast.moe) against the reference grouped MoE.

* Random valid blocks, gate/up and down of different types (Q4_K + Q6_K as in Q4_K_M, and all
  the other native types), T = 1, 2, 7 tokens, top-2 and top-8: max |error| <= 5e-3 * max |ref|
  (the native integer kernels reach ~1e-4, so a tighter bound also guards against real bugs).
* Native routing (mk_moe_routed): the same expert ids, in the same order, as `route()`, weights
  within float32 rounding, with and without renormalisation.
* A whole small qwen3moe model: fast kernels (fused MoE for decode-sized batches) vs reference
  kernels, logits within 1e-2 * max |logits| and the same argmax, both for a full prompt and for
  single-token decode steps against the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import dequantize, random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.fast import native, prepare_experts
from moeserve.kernels.fast.moe import FusedMoE, make_moe
from moeserve.kernels.moe import grouped_moe
from moeserve.kernels.qlinear import QExperts

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")

E, H, I = 16, 512, 256
BOUND = 5e-3
TYPE_PAIRS = [  # (gate/up, down)
    (QT.Q4_K, QT.Q6_K),
    (QT.Q8_0, QT.Q8_0),
    (QT.Q4_0, QT.Q4_1),
    (QT.Q5_K, QT.Q5_0),
    (QT.Q5_1, QT.Q4_K),
]


def _stack(qt: QT, shape: tuple[int, int, int], seed: int) -> QExperts:
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(random_quant_bytes(qt, shape, rng, scale=shape[-1] ** -0.5))
    return QExperts(PackedTensor(f"w{seed}", qt, shape, raw))


def _dense(q: QExperts) -> torch.Tensor:
    """The float32 [E, out, in] stack, dequantized once (cached on the object) by the reference."""
    if not hasattr(q, "_test_dense"):
        q._test_dense = dequantize(q.weight.data, q.weight.qtype, q.in_features).view(E, q.out_features, q.in_features)
    return q._test_dense


def _reference(gate: QExperts, up: QExperts, down: QExperts, x, w, ids) -> torch.Tensor:
    """The reference grouped MoE (kernels/moe.py) on the reference-dequantized experts."""
    g, u, d = _dense(gate), _dense(up), _dense(down)
    return grouped_moe(x.float(), w, ids, E, lambda e, xx: F.silu(xx @ g[e].T) * (xx @ u[e].T) @ d[e].T)


def _route(T: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    return w, ids


@pytest.mark.parametrize("types", TYPE_PAIRS, ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_fused_matches_reference(types: tuple[QT, QT]) -> None:
    gq, dq = types
    gate, up, down = _stack(gq, (E, I, H), 1), _stack(gq, (E, I, H), 2), _stack(dq, (E, H, I), 3)
    fused = make_moe(gate, up, down)
    assert isinstance(fused, FusedMoE)
    gen = torch.Generator().manual_seed(0)
    errs = []
    for T in (1, 2, 7):
        for k in (2, 8):
            x = torch.randn(T, H, generator=gen)
            w, ids = _route(T, k, gen)
            ref = _reference(gate, up, down, x, w, ids)
            y = fused(x, w, ids)
            assert y.shape == (T, H) and y.dtype == torch.float32
            errs.append(((y - ref).abs().max() / ref.abs().max()).item())
    assert max(errs) <= BOUND, errs
    assert max(errs) < 5e-4, errs  # 16-bit activations: far inside the bound


def test_fused_shared_experts_and_odd_inputs() -> None:
    """Several tokens on one expert (each row read once for all), bf16 input, non-contiguous ids."""
    gate, up, down = _stack(QT.Q4_K, (E, I, H), 4), _stack(QT.Q4_K, (E, I, H), 5), _stack(QT.Q6_K, (E, H, I), 6)
    fused = make_moe(gate, up, down)
    assert fused is not None
    gen = torch.Generator().manual_seed(1)
    T, k = 5, 4
    x = torch.randn(T, H, generator=gen)
    ids = torch.tensor([[3, 1, 7, 0]] * 3 + [[1, 3, 2, 9], [15, 3, 1, 8]])
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    ref = _reference(gate, up, down, x, w, ids)
    assert ((fused(x, w, ids) - ref).abs().max() / ref.abs().max()).item() < 5e-4
    got = fused(x.to(torch.bfloat16), w, ids.t().contiguous().t().int())
    ref16 = _reference(gate, up, down, x.to(torch.bfloat16).float(), w, ids)
    assert ((got - ref16).abs().max() / ref16.abs().max()).item() < 5e-4
    with pytest.raises(RuntimeError, match="out of range"):
        fused(x, w, torch.full((T, k), E))


def test_make_moe_declines_unsupported() -> None:
    gate, up = _stack(QT.Q4_K, (E, I, H), 7), _stack(QT.Q4_K, (E, I, H), 8)
    bad_down = _stack(QT.Q4_K, (E, H, I + 256), 9)  # inconsistent shapes
    assert make_moe(gate, up, bad_down) is None
    f32 = QExperts(PackedTensor("f", QT.F32, (E, H, I), torch.zeros(E, H, I * 4, dtype=torch.uint8)))
    assert make_moe(gate, up, f32) is None


def test_fused_after_prepare_experts() -> None:
    """The fused path reads the same mapped bytes the per-expert native kernels use."""
    gate, up, down = _stack(QT.Q4_K, (E, I, H), 10), _stack(QT.Q4_K, (E, I, H), 11), _stack(QT.Q6_K, (E, H, I), 12)
    fused = make_moe(gate, up, down)
    for q in (gate, up, down):
        prepare_experts(q)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, H, generator=gen)
    w, ids = _route(2, 8, gen)
    grouped = grouped_moe(x, w, ids, E, lambda e, xx: down(e, F.silu(gate(e, xx)) * up(e, xx)))
    assert ((fused(x, w, ids) - grouped).abs().max() / grouped.abs().max()).item() < 1e-4


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_native_routing(renormalize: bool) -> None:
    """mk_moe_routed: float32 router logits, softmax, top-k (and renormalisation) in C == route()."""
    from moeserve.kernels.moe import route
    from moeserve.kernels.qlinear import QLinear

    gate, up, down = _stack(QT.Q4_K, (E, I, H), 13), _stack(QT.Q4_K, (E, I, H), 14), _stack(QT.Q6_K, (E, H, I), 15)
    gen = torch.Generator().manual_seed(3)
    wr = torch.randn(E, H, generator=gen) * 4 * H**-0.5
    router = QLinear(PackedTensor("r", QT.F32, (E, H), wr.view(torch.uint8).reshape(E, 4 * H)))
    fused = make_moe(gate, up, down)
    assert fused is not None and fused.top_k == 0
    with pytest.raises(RuntimeError, match="no router"):
        fused.routed(torch.randn(1, H))
    assert fused.attach_router(router, 4, renormalize)
    for T in (1, 3, 7):
        x = torch.randn(T, H, generator=gen)
        out, w, ids = fused.routed(x)
        w_ref, ids_ref = route(x @ wr.T, 4, renormalize)
        assert torch.equal(ids, ids_ref)  # same experts in the same (descending) order
        assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-6)
        ref = _reference(gate, up, down, x, w_ref, ids_ref)
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-4
    q8_bytes = torch.from_numpy(random_quant_bytes(QT.Q8_0, (E, H), np.random.default_rng(0)))
    q8 = QLinear(PackedTensor("r8", QT.Q8_0, (E, H), q8_bytes))
    assert not make_moe(gate, up, down).attach_router(q8, 4, True)  # float32 routers only


@pytest.fixture(scope="module")
def moe_model(make_model):
    # H and the expert FFN are multiples of 256 so the native kernels (and the fused path) apply.
    return make_model("fused_moe", n_layers=2, hidden_size=256, head_dim=64, n_heads=4, n_kv_heads=2,
                      n_experts=8, n_experts_used=2, expert_ffn=256, vocab_size=384, qtype=QT.Q4_K,
                      qtypes={"*ffn_down_exps.weight": QT.Q6_K, "*ffn_gate_inp.weight": QT.F32})


def test_model_fast_vs_reference(moe_model) -> None:
    from moeserve.engine.llm import LLM
    from moeserve.model.layers import MoE

    fast = LLM(str(moe_model), kernels="fast", warmup=False, max_model_len=64)
    ref = LLM(str(moe_model), kernels="reference", warmup=False, max_model_len=64)
    moes = [b.ffn for b in fast.model.blocks if isinstance(b.ffn, MoE)]
    assert moes and all(m.fused is not None and m.fused.top_k == m.top_k for m in moes)
    assert all(b.ffn.fused is None for b in ref.model.blocks)

    ids = [5, 17, 300, 42, 9, 250, 77]  # 7 tokens <= max_tokens: the fused path
    a, prompt_ref = fast.logits(ids), ref.logits(ids)
    assert np.abs(a - prompt_ref).max() <= 1e-2 * np.abs(prompt_ref).max()
    assert (a.argmax(-1) == prompt_ref.argmax(-1)).all()

    seq = ("s",)
    try:  # single-token decode steps against the cache
        for tok in ids[:4]:
            a = fast._forward([(seq, [tok])]).numpy()
            b = ref._forward([(seq, [tok])]).numpy()
            assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
            assert (a.argmax(-1) == b.argmax(-1)).all()
    finally:
        fast.kv.release(seq)
        ref.kv.release(seq)

    for m in moes:  # routing in Python, then the fused experts
        m.fused.top_k = 0
    a = fast.logits(ids)
    assert np.abs(a - prompt_ref).max() <= 1e-2 * np.abs(prompt_ref).max()
    assert (a.argmax(-1) == prompt_ref.argmax(-1)).all()

    for m in moes:  # a prompt longer than max_tokens takes the grouped path: same answer
        m.fused.max_tokens = 0
    long_ids = ids * 3
    a, b = fast.logits(long_ids), ref.logits(long_ids)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
