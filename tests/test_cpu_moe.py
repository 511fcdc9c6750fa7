"""Fused native decode MoE (moeserve.kernels.cpu.moe, `torch.ops.moeserve.moe` / `moe_routed`) against the
reference grouped MoE.

* Random valid blocks, gate/up and down of different types (Q4_K + Q6_K as in Q4_K_M, and all
  the other native types), T = 1, 2, 7 tokens, top-2 and top-8: max |error| <= 5e-3 * max |ref|
  (the native integer kernels reach ~1e-4, so a tighter bound also guards against real bugs).
* Native routing (moe_routed): the same expert ids, in the same order, as `route()`, weights
  within float32 rounding, with and without renormalisation.
* Two threads calling one FusedMoE at once get the single-threaded results.

Nothing here is skipped: on a CPU with AVX2/FMA/F16C a failed build fails these tests.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import dequantize, random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.cpu import native
from moeserve.kernels.cpu.moe import MAX_TOKENS, FusedMoE, make_moe, supports, supports_moe
from moeserve.kernels.moe import grouped_moe, route

E, H, I = 16, 512, 256
BOUND = 5e-3
TYPE_PAIRS = [  # (gate/up, down)
    (QT.Q4_K, QT.Q6_K),
    (QT.Q8_0, QT.Q8_0),
    (QT.Q4_0, QT.Q4_1),
    (QT.Q5_K, QT.Q5_0),
    (QT.Q5_1, QT.Q4_K),
    (QT.Q3_K, QT.Q2_K),
    (QT.IQ4_XS, QT.IQ4_NL),
]


class _Router:
    """A linear or stack as the fused MoE reads it: `weight` (a PackedTensor) and, for a router, `bias`."""

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias


def _stack(qt: QT, shape: tuple[int, int, int], seed: int) -> native.NativeExperts:
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(random_quant_bytes(qt, shape, rng, scale=shape[-1] ** -0.5))
    return native.NativeExperts(PackedTensor(f"w{seed}", qt, shape, raw))


def _dense(q: native.NativeExperts) -> torch.Tensor:
    """The float32 [E, out, in] stack, dequantized once (cached on the object) by the reference."""
    if not hasattr(q, "_test_dense"):
        q._test_dense = dequantize(q.weight.data, q.weight.qtype, q.in_features).view(E, q.out_features, q.in_features)
    return q._test_dense


def _reference(gate, up, down, x, w, ids) -> torch.Tensor:
    """The reference grouped MoE (kernels/moe.py) on the reference-dequantized experts."""
    g, u, d = _dense(gate), _dense(up), _dense(down)
    return grouped_moe(x.float(), w, ids, E, lambda e, xx: F.silu(xx @ g[e].T) * (xx @ u[e].T) @ d[e].T)


def _route(T: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    return w, ids


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("types", TYPE_PAIRS, ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_fused_matches_reference(types: tuple[QT, QT]) -> None:
    gq, dq = types
    gate, up, down = _stack(gq, (E, I, H), 1), _stack(gq, (E, I, H), 2), _stack(dq, (E, H, I), 3)
    fused = make_moe(gate, up, down)
    assert isinstance(fused, FusedMoE) and fused.max_tokens == MAX_TOKENS and fused.top_k == 0
    gen = torch.Generator().manual_seed(0)
    errs = []
    for T in (1, 2, 7):
        for k in (2, 8):
            x = torch.randn(T, H, generator=gen)
            w, ids = _route(T, k, gen)
            ref = _reference(gate, up, down, x, w, ids)
            y = fused(x, w, ids)
            assert y.shape == (T, H) and y.dtype == torch.float32
            errs.append(_rel(y, ref))
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
    assert _rel(fused(x, w, ids), ref) < 5e-4
    got = fused(x.to(torch.bfloat16), w, ids.t().contiguous().t().int())
    ref16 = _reference(gate, up, down, x.to(torch.bfloat16).float(), w, ids)
    assert _rel(got, ref16) < 5e-4
    with pytest.raises(RuntimeError, match="out of range"):
        fused(x, w, torch.full((T, k), E))
    with pytest.raises(RuntimeError, match="out of range"):
        fused(x, w, torch.full((T, k), -1))
    with pytest.raises(RuntimeError, match="moe: weights"):
        fused(x, w[:, :2], ids)


def test_make_moe_declines_unsupported() -> None:
    gate, up = _stack(QT.Q4_K, (E, I, H), 7), _stack(QT.Q4_K, (E, I, H), 8)
    bad_down = _stack(QT.Q4_K, (E, H, I + 256), 9)  # inconsistent shapes
    assert make_moe(gate, up, bad_down) is None and not supports(gate, up, bad_down)
    f32 = _Router(PackedTensor("f", QT.F32, (E, H, I), torch.zeros(E, H, I * 4, dtype=torch.uint8)))
    assert make_moe(gate, up, f32) is None and not supports_moe(gate, up, f32)


def test_fused_equals_per_expert_native_kernels() -> None:
    """The fused path reads the same bytes with the same dot products as the per-expert native kernels."""
    gate, up, down = _stack(QT.Q4_K, (E, I, H), 10), _stack(QT.Q4_K, (E, I, H), 11), _stack(QT.Q6_K, (E, H, I), 12)
    fused = make_moe(gate, up, down)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, H, generator=gen)
    w, ids = _route(2, 8, gen)
    grouped = grouped_moe(x, w, ids, E, lambda e, xx: down(e, F.silu(gate(e, xx)) * up(e, xx)))
    assert _rel(fused(x, w, ids), grouped) < 1e-4


def _router(gen: torch.Generator) -> tuple[_Router, torch.Tensor]:
    wr = torch.randn(E, H, generator=gen) * 4 * H**-0.5
    return _Router(PackedTensor("r", QT.F32, (E, H), wr.view(torch.uint8).reshape(E, 4 * H))), wr


@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_native_routing(renormalize: bool) -> None:
    """moe_routed: float32 router logits, softmax, top-k (and renormalisation) in C == route()."""
    gate, up, down = _stack(QT.Q4_K, (E, I, H), 13), _stack(QT.Q4_K, (E, I, H), 14), _stack(QT.Q6_K, (E, H, I), 15)
    gen = torch.Generator().manual_seed(3)
    router, wr = _router(gen)
    fused = make_moe(gate, up, down)
    assert fused is not None and fused.top_k == 0
    with pytest.raises(RuntimeError, match="no router"):
        fused.routed(torch.randn(1, H))
    assert fused.attach_router(router, 4, renormalize) and fused.top_k == 4
    for T in (1, 3, 7):
        x = torch.randn(T, H, generator=gen)
        out, w, ids = fused.routed(x)
        w_ref, ids_ref = route(x @ wr.T, 4, renormalize)
        assert torch.equal(ids, ids_ref)  # same experts in the same (descending) order
        assert torch.allclose(w, w_ref, rtol=1e-5, atol=1e-6)
        ref = _reference(gate, up, down, x, w_ref, ids_ref)
        assert _rel(out, ref) < 5e-4
    q8_bytes = torch.from_numpy(random_quant_bytes(QT.Q8_0, (E, H), np.random.default_rng(0)))
    q8 = _Router(PackedTensor("r8", QT.Q8_0, (E, H), q8_bytes))
    assert not make_moe(gate, up, down).attach_router(q8, 4, True)  # float32 routers only
    assert not make_moe(gate, up, down).attach_router(_Router(router.weight, torch.zeros(E)), 4, True)  # no bias
    assert not make_moe(gate, up, down).attach_router(router, E + 1, True)


def test_fused_moe_is_reentrant() -> None:
    """Two threads calling one FusedMoE (routed and with given routing) at once, with different token counts,
    get exactly the single-threaded results."""
    gate, up, down = _stack(QT.Q4_K, (E, I, H), 16), _stack(QT.Q4_K, (E, I, H), 17), _stack(QT.Q6_K, (E, H, I), 18)
    gen = torch.Generator().manual_seed(4)
    fused = make_moe(gate, up, down)
    assert fused.attach_router(_router(gen)[0], 4, True)
    cases = []
    for i in range(6):
        T = 1 + i % 3
        w, ids = _route(T, 4, gen)
        cases.append((torch.randn(T, H, generator=gen), w, ids))

    def step(i: int):
        x, w, ids = cases[i % len(cases)]
        return fused(x, w, ids), fused.routed(x)

    want = [step(i) for i in range(len(cases))]
    barrier = threading.Barrier(2)
    results: list[list] = [[], []]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(30):
                results[t].append(step(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for per_thread in results:
        for i, (out, routed) in enumerate(per_thread):
            ref_out, ref_routed = want[i % len(cases)]
            assert torch.equal(out, ref_out)
            assert all(torch.equal(a, b) for a, b in zip(routed, ref_routed, strict=True))
