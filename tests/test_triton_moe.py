"""Fused Triton MoE (moeserve.kernels.triton.fused_moe) against the reference grouped MoE.

* `align_blocks`: every (token, slot) pair lands in exactly one row of a block of its own expert, padding
  rows hold the sentinel, the used-row count is the padded total, and all shapes depend on T alone.
* `route_align` (routing and alignment in one kernel, up to 1024 pairs) equal to `route` + `align_blocks`:
  T = 1, 3, 16, 64, 128, E = 8 and 128, top-2 and top-8, with and without renormalisation, BLOCK_M 16
  and 64 (logits without ties: ids, sorted_ids, block_expert of the used blocks and n_rows exact,
  weights within 1e-6 relative); exact ties go to the lowest expert index.
* `router_route_align` (the router's product in the same launch, decode steps of up to 16 tokens) equal to
  `route_align` on the router's logits, float32 and float16 routers, E = 8 and 128.
* `TritonMoE` on random valid blocks, E = 8, gate/up and down of different types (Q4_K + Q6_K as in
  Q4_K_M, and the other types), T = 1, 5, 33 (BLOCK_M 16) and 70 (BLOCK_M 64), top-2 and top-3, with
  and without renormalisation: within 2e-3 * max |ref| of `GroupedMoE` on the same router (fp16 and TF32
  operands in the kernels; the float32 reference differs by ~5e-4); the torch routing path (above 1024
  pairs) against the fused one.
* A SwiGLU product past fp16's range (real checkpoints' massive activations) goes through the block finite
  and within the bound (float32 act, TF32 down product), at T = 1 and 70.

Without a GPU the kernels run under Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch

pytest.importorskip("triton")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from moeserve.gguf.quants import random_quant_bytes  # noqa: E402
from moeserve.gguf.reader import PackedTensor  # noqa: E402
from moeserve.kernels.moe import GroupedMoE, route  # noqa: E402
from moeserve.kernels.qlinear import ReferenceExperts  # noqa: E402
from moeserve.kernels.triton import fused_moe  # noqa: E402
from moeserve.kernels.triton.fused_moe import (  # noqa: E402
    TritonMoE,
    align_blocks,
    block_m_for,
    route_align,
    router_route_align,
)
from moeserve.kernels.triton.qmatmul import TritonLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E, H, I = 8, 256, 256
BOUND = 2e-3
TYPE_PAIRS = [  # (gate/up, down): every packed type at least once
    (QT.Q4_K, QT.Q6_K),
    (QT.Q8_0, QT.Q4_0),
    (QT.Q5_1, QT.Q5_K),
    (QT.Q4_1, QT.Q8_0),
    (QT.Q5_0, QT.Q4_K),
    (QT.Q3_K, QT.Q2_K),
    (QT.IQ4_XS, QT.IQ4_NL),
    (QT.BF16, QT.F16),  # a BF16 file's experts: float stacks, TF32 gate/up
]
CASES = [(1, 2, True), (5, 3, False), (33, 3, True)]  # (T, top_k, renormalize)


def _weight(qt: QT, shape: tuple[int, ...], seed: int) -> PackedTensor:
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(seed), scale=shape[-1] ** -0.5))
    return PackedTensor(f"w{seed}", qt, shape, raw.to(DEVICE))


def _moe(types: tuple[QT, QT], top_k: int, renormalize: bool, hidden: int = H,
         inter: int = I) -> tuple[TritonMoE, GroupedMoE]:
    gq, dq = types
    router = TritonLinear(_weight(QT.F32, (E, hidden), 0))
    gate, up = _weight(gq, (E, inter, hidden), 1), _weight(gq, (E, inter, hidden), 2)
    down = _weight(dq, (E, hidden, inter), 3)
    ref = GroupedMoE(router, ReferenceExperts(gate), ReferenceExperts(up), ReferenceExperts(down), top_k, renormalize)
    return TritonMoE(router, gate, up, down, top_k, renormalize), ref


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert a.dtype == torch.float32 and a.shape == ref.shape
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("T", [1, 7, 40])
def test_align_blocks(T: int, block_m: int) -> None:
    k = 3
    gen = torch.Generator().manual_seed(T)
    experts = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(DEVICE)
    sorted_ids, block_expert, n_rows = align_blocks(experts, E, block_m)
    n = T * k
    n_blocks = (n + min(E, n) * (block_m - 1)) // block_m
    assert sorted_ids.shape == (n_blocks * block_m,) and block_expert.shape == (n_blocks,)
    counts = torch.bincount(experts.flatten().cpu(), minlength=E)
    used = int(((counts + block_m - 1) // block_m * block_m).sum())
    assert n_rows.tolist() == [used]
    ids, blocks = sorted_ids.cpu(), block_expert.cpu()
    real = ids[:used][ids[:used] < n]
    assert sorted(real.tolist()) == list(range(n))  # every pair exactly once, in the used rows
    assert (ids[used:] == n).all()
    flat = experts.flatten().cpu()
    for b in range(used // block_m):
        rows = ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < n]
        assert len(rows) > 0 and (flat[rows.long()] == blocks[b]).all()  # one expert per block, none empty
        assert rows.tolist() == sorted(rows.tolist())  # stable: token order within an expert


def _distinct_logits(T: int, n_experts: int, seed: int) -> torch.Tensor:
    """Router-like logits [T, E] (range ~8) with no two equal in a row, nor their softmax probabilities:
    a permutation of a grid of step 8/E, jittered by under a quarter step."""
    gen = torch.Generator().manual_seed(seed)
    step = 8.0 / n_experts
    grid = torch.stack([torch.randperm(n_experts, generator=gen) for _ in range(T)]).float() * step - 4.0
    return grid + torch.rand(T, n_experts, generator=gen) * (step / 4)


@pytest.mark.parametrize("n_experts", [8, 128])
@pytest.mark.parametrize("T", [1, 3, 16, 64, 128, 200])
def test_route_align_matches_torch(T: int, n_experts: int) -> None:
    """Up to 1024 pairs one program; above (T=200 at top-8, 128 at top-8 is exactly 1024) the tile kernels."""
    logits = _distinct_logits(T, n_experts, seed=T * 1000 + n_experts).to(DEVICE)
    for k in (2, 8):
        for renormalize in (True, False):
            ref_w, ref_e = route(logits, k, renormalize)
            for block_m in (16, 64):
                w, e, ids, blocks, n_rows = route_align(logits, k, renormalize, block_m)
                ref_ids, ref_blocks, ref_rows = align_blocks(ref_e, n_experts, block_m)
                case = (T, n_experts, k, renormalize, block_m)
                assert w.dtype == torch.float32 and e.dtype == ref_e.dtype and ids.dtype == torch.int32, case
                assert torch.equal(e, ref_e), case
                assert ((w - ref_w).abs() <= 1e-6 * ref_w.abs()).all(), case
                assert torch.equal(n_rows, ref_rows), case
                assert torch.equal(ids, ref_ids), case  # padding and unused rows: the sentinel T*k
                assert blocks.shape == ref_blocks.shape and blocks.dtype == torch.int32, case
                used = int(ref_rows) // block_m
                assert torch.equal(blocks[:used], ref_blocks[:used]), case
                assert ((blocks >= 0) & (blocks < n_experts)).all(), case  # unused blocks: any valid expert


def test_route_align_ties_and_limits() -> None:
    """Equal logits go to the lowest expert index, in both the one-program and the tile kernels; empty batches;
    top_k past E is refused."""
    logits = torch.zeros(2, 16).to(DEVICE)
    logits[1, 5:] = 1.0  # token 1: experts 5..15 tie
    w, e, ids, blocks, n_rows = route_align(logits, 4, True, 16)
    assert e.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]]
    assert torch.allclose(w, torch.full_like(w, 0.25))
    w, _, _, _, _ = route_align(logits, 4, False, 16)
    assert torch.allclose(w[0], torch.full((4,), 1 / 16, device=DEVICE))
    assert n_rows.tolist() == [16 * 8]  # experts 0-3 and 5-8, one pair each: 8 blocks
    assert ids[:16].tolist() == [0] + [8] * 15 and blocks[:8].tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    logits[0, 2:] = float("-inf")  # token 0: two finite logits for top-4; -inf ones by index, weight 0
    w, e, ids, blocks, n_rows = route_align(logits, 4, True, 16)
    assert e.tolist() == [[0, 1, 2, 3], [5, 6, 7, 8]] and w[0].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert sorted(ids[ids < 8].tolist()) == list(range(8)) and n_rows.tolist() == [16 * 8]
    outs = route_align(torch.empty(0, 16, device=DEVICE), 2, True, 16)
    assert [tuple(o.shape) for o in outs] == [(0, 2), (0, 2), (0,), (0,), (1,)] and outs[4].tolist() == [0]
    tied = torch.zeros(300, 16, device=DEVICE)
    tied[::2, 5:] = 1.0  # 600 pairs at top-2 on the tile path (FUSED_ROUTE_MAX_PAIRS: 1024)
    w, e, _, _, _ = route_align(tied.repeat(2, 1), 2, True, 16)
    assert e[0].tolist() == [5, 6] and e[1].tolist() == [0, 1] and (e[::2] == e[0]).all() and (e[1::2] == e[1]).all()
    with pytest.raises(ValueError):
        route_align(torch.zeros(3, 8, device=DEVICE), 9, True, 64)


@pytest.mark.parametrize("n_experts,hidden", [(8, 96), (128, 2048)])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_router_route_align_matches_route_align(T: int, n_experts: int, hidden: int) -> None:
    """The router's product in the routing launch: the same routing as `route_align` on `h @ W.T`, logits
    within float32 rounding, for float32 and float16 routers; the arrival counter is back at zero."""
    from moeserve.kernels.triton.qmatmul import counters

    g = torch.Generator().manual_seed(T * 100 + n_experts)
    h = torch.randn(T, hidden, generator=g).to(DEVICE)
    w = (torch.randn(n_experts, hidden, generator=g) / hidden ** 0.5).to(DEVICE)
    for dtype in (torch.float32, torch.float16):
        router = w.to(dtype)
        for k, renormalize in ((2, True), (8, False)):
            got = router_route_align(h, router, k, renormalize, 16)
            want = route_align(h @ router.float().T, k, renormalize, 16)
            case = (T, n_experts, dtype, k)
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), case  # experts, sorted_ids
            assert torch.equal(got[4], want[4]), case  # n_rows
            used = int(want[4]) // 16
            assert torch.equal(got[3][:used], want[3][:used]), case
            assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6), case
    assert not counters(0, torch.device(DEVICE), "router").any()
    with pytest.raises(ValueError):
        router_route_align(torch.zeros(17, hidden, device=DEVICE), w, 2, True, 16)


@pytest.mark.parametrize("types", TYPE_PAIRS, ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_moe_matches_reference(types: tuple[QT, QT]) -> None:
    for T, k, renormalize in CASES:
        moe, ref = _moe(types, k, renormalize)
        h = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(DEVICE)
        y = moe(h)
        assert y.shape == (T, H)
        assert _rel(y, ref(h)) <= BOUND, (types, T, k, renormalize)


@pytest.mark.parametrize("types", TYPE_PAIRS[:2] + TYPE_PAIRS[-1:], ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_moe_prefill_blocks(types: tuple[QT, QT]) -> None:
    """Enough pairs for the 64-row blocks of the prefill configuration."""
    T, k = 70, 2
    assert block_m_for(T * k, E) == 64
    moe, ref = _moe(types, k, False)
    h = torch.randn(T, H, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert _rel(moe(h), ref(h)) <= BOUND


def test_moe_routing_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block's three routing paths give the same output: the router in the routing launch (up to 16 tokens),
    one routing program (up to FUSED_ROUTE_MAX_PAIRS pairs), the tile kernels above."""
    moe, ref = _moe(TYPE_PAIRS[0], 3, True)
    h = torch.randn(6, H, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    fused = moe(h)
    monkeypatch.setattr(fused_moe, "ROUTER_FUSED_MAX_T", 0)
    one_program = moe(h)
    monkeypatch.setattr(fused_moe, "FUSED_ROUTE_MAX_PAIRS", 0)
    tiles = moe(h)
    assert torch.equal(tiles, one_program) and _rel(one_program, fused) <= 1e-5 and _rel(tiles, ref(h)) <= BOUND


def test_down_sums_over_k_in_the_same_launch() -> None:
    """The down kernel's last-arriving program adds each token's k parts: same result every call (a fixed
    order), and every (token, column tile) counter back at zero for the next launch or graph replay."""
    from moeserve.kernels.triton.qmatmul import counters

    moe, ref = _moe(TYPE_PAIRS[0], 3, True)
    h = torch.randn(5, H, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    y = moe(h)
    assert torch.equal(moe(h), y) and _rel(y, ref(h)) <= BOUND
    assert not counters(0, torch.device(DEVICE), "moe_down").any()


def test_gate_up_split_k() -> None:
    """Decode blocks split gate/up's K range over programs (as qmatmul does), the last split adding the partials
    and applying SiLU·mul: the output of one split up to the float32 summation order, every call the same, and
    the (block, column tile) counters back at zero. (A different float32 order may flip a TF32 rounding of act
    in the down product: ~1e-4 of the output.)"""
    from moeserve.kernels.triton.qmatmul import counters

    hidden, inter = 1024, 256  # 4 K steps of 256 weights
    moe, ref = _moe(TYPE_PAIRS[0], 2, True, hidden, inter)
    for T in (1, 5):
        h = torch.randn(T, hidden, generator=torch.Generator().manual_seed(T)).to(DEVICE)
        moe.split_k = None  # off the GPU: one split
        one = moe(h)
        moe.split_k = 4
        y = moe(h)
        assert torch.equal(moe(h), y) and _rel(y, one) <= 1e-3 and _rel(y, ref(h)) <= BOUND, T
        assert not counters(0, torch.device(DEVICE), "moe_gate_up").any()
    moe.split_k = 3
    with pytest.raises(ValueError, match="split_k=3"):
        moe(h)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp(-x) overflow in the SiLU: 0
@pytest.mark.parametrize("T", [1, 70])
def test_moe_activations_past_fp16_range(T: int) -> None:
    """The SwiGLU product the down kernel reads passes fp16's 65,504 (as real checkpoints' "massive
    activations" do): act is float32 and down a TF32 product, so the block's output is finite and within the
    bound of the reference — decode blocks (down transposed, SWAP) and prefill blocks alike. With fp16 act it
    was inf, then NaN."""
    moe, ref = _moe(TYPE_PAIRS[0], 2, True)
    h = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(DEVICE) * 3000
    _, experts = route(ref.router(h), 2, True)
    act = max((torch.nn.functional.silu(ref.gate(e, h)) * ref.up(e, h)).abs().max().item()
              for e in experts.unique().tolist())
    assert act > 65504
    y = moe(h)
    assert torch.isfinite(y).all() and _rel(y, ref(h)) <= BOUND


def test_moe_edge_inputs() -> None:
    moe, ref = _moe(TYPE_PAIRS[0], 2, True)
    assert moe(torch.empty(0, H, device=DEVICE)).shape == (0, H)
    h = torch.randn(3, H).to(DEVICE)
    y = moe(h)
    assert _rel(moe(h.to(torch.bfloat16)), y) <= 2e-2  # bf16 activations (rounded, then fp16 in the kernel)
    assert _rel(y, ref(h)) <= BOUND


def test_moe_mixed_gate_up_types_use_the_reference() -> None:
    """Gate and up of different types have no fused kernel: the block runs the reference grouped MoE."""
    router = TritonLinear(_weight(QT.F32, (E, H), 0))
    gate, up, down = _weight(QT.Q4_K, (E, I, H), 1), _weight(QT.Q8_0, (E, I, H), 2), _weight(QT.Q6_K, (E, H, I), 3)
    moe = TritonMoE(router, gate, up, down, 2, True)
    ref = GroupedMoE(router, ReferenceExperts(gate), ReferenceExperts(up), ReferenceExperts(down), 2, True)
    h = torch.randn(4, H).to(DEVICE)
    assert torch.equal(moe(h), ref(h))


def test_mix_matches_reference() -> None:
    """`mix` (routing decided elsewhere, as an expert-parallel rank does: one row per (token, expert) pair)."""
    triton_moe, ref = _moe(TYPE_PAIRS[0], 2, True)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(6, H, generator=g).to(DEVICE)
    experts = torch.tensor([[3], [0], [7], [3], [5], [1]], device=DEVICE)
    weights = torch.rand(6, 1, generator=g).to(DEVICE)
    want = ref.mix(h, weights, experts)
    got = triton_moe.mix(h, weights, experts)
    assert float((got - want).abs().max()) <= BOUND * float(want.abs().max())
