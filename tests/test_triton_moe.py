"""Fused Triton MoE (moeserve.kernels.triton.fused_moe) against the reference grouped MoE.

* `align_blocks`: every (token, slot) pair lands in exactly one row of a block of its own expert, padding
  rows hold the sentinel, the used-row count is the padded total, and all shapes depend on T alone.
* `TritonMoE` on random valid blocks, E = 8, gate/up and down of different types (Q4_K + Q6_K as in
  Q4_K_M, and the other types), T = 1, 5, 33 (BLOCK_M 16) and 70 (BLOCK_M 64), top-2 and top-3, with
  and without renormalisation: within 2e-3 * max |ref| of `GroupedMoE` on the same router (fp16
  operands in the kernels; the float32 reference differs by ~5e-4).

Without a GPU the kernels run under Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("triton")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from moeserve.gguf.quants import random_quant_bytes  # noqa: E402
from moeserve.gguf.reader import PackedTensor  # noqa: E402
from moeserve.kernels.moe import GroupedMoE  # noqa: E402
from moeserve.kernels.qlinear import ReferenceExperts  # noqa: E402
from moeserve.kernels.triton.fused_moe import TritonMoE, align_blocks, block_m_for  # noqa: E402
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
]
CASES = [(1, 2, True), (5, 3, False), (33, 3, True)]  # (T, top_k, renormalize)


def _weight(qt: QT, shape: tuple[int, ...], seed: int) -> PackedTensor:
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(seed), scale=shape[-1] ** -0.5))
    return PackedTensor(f"w{seed}", qt, shape, raw.to(DEVICE))


def _moe(types: tuple[QT, QT], top_k: int, renormalize: bool) -> tuple[TritonMoE, GroupedMoE]:
    gq, dq = types
    router = TritonLinear(_weight(QT.F32, (E, H), 0))
    gate, up, down = _weight(gq, (E, I, H), 1), _weight(gq, (E, I, H), 2), _weight(dq, (E, H, I), 3)
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


@pytest.mark.parametrize("types", TYPE_PAIRS, ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_moe_matches_reference(types: tuple[QT, QT]) -> None:
    for T, k, renormalize in CASES:
        moe, ref = _moe(types, k, renormalize)
        h = torch.randn(T, H, generator=torch.Generator().manual_seed(T)).to(DEVICE)
        y = moe(h)
        assert y.shape == (T, H)
        assert _rel(y, ref(h)) <= BOUND, (types, T, k, renormalize)


@pytest.mark.parametrize("types", TYPE_PAIRS[:2], ids=lambda t: f"{t[0].name}-{t[1].name}")
def test_moe_prefill_blocks(types: tuple[QT, QT]) -> None:
    """Enough pairs for the 64-row blocks of the prefill configuration."""
    T, k = 70, 2
    assert block_m_for(T * k, E) == 64
    moe, ref = _moe(types, k, False)
    h = torch.randn(T, H, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert _rel(moe(h), ref(h)) <= BOUND


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
