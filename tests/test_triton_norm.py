"""The triton backend's RMSNorm and q/k/v projection (QK-norm + RoPE, fused into the products' epilogue or in a
kernel of its own) against the reference `RMSNorm` and `QKVRope`.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest  # noqa: E402
import torch
from gguf import GGMLQuantizationType as QT

pytest.importorskip("triton")

from moeserve.gguf.quants import random_quant_bytes  # noqa: E402
from moeserve.gguf.reader import PackedTensor  # noqa: E402
from moeserve.kernels.metadata import AttentionMetadata, KVCacheTensors, positions_metadata  # noqa: E402
from moeserve.kernels.reference import QKVRope, RMSNorm  # noqa: E402
from moeserve.kernels.rope import Rope  # noqa: E402
from moeserve.kernels.triton.norm import TritonRMSNorm  # noqa: E402
from moeserve.kernels.triton.qkv import TritonQKV  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class TorchLinear:
    """A plain `x @ W.T` Linear, float32 out (any backend's Linear would do)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w, self.out_features, self.in_features = w, *w.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.w.T


@pytest.mark.parametrize("H", [64, 48, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_matches_reference(H, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(7, H, generator=g)).to(DEVICE, dtype)
    w = torch.randn(H, generator=g).to(DEVICE)
    got = TritonRMSNorm(w, 1e-6)(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, RMSNorm(w, 1e-6)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H", [64, 1000])
def test_add_norm_is_the_sum_then_the_norm(H):
    """The fused residual add + RMSNorm: the same float32 sum as `x + delta` (bitwise) and its norm."""
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(5, H, generator=g)).to(DEVICE)
    delta = torch.randn(5, H, generator=g).to(DEVICE)
    w = torch.randn(H, generator=g).to(DEVICE)
    s, h = TritonRMSNorm(w, 1e-6).add_norm(x, delta)
    ref_s, ref_h = RMSNorm(w, 1e-6).add_norm(x, delta)
    assert torch.equal(s, ref_s) and torch.equal(ref_s, x + delta)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    s0, h0 = TritonRMSNorm(w, 1e-6).add_norm(x, None)  # the first block: nothing pending
    assert s0 is x
    torch.testing.assert_close(h0, RMSNorm(w, 1e-6)(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_of_a_strided_view_and_no_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 96, generator=g).to(DEVICE)[:, :32]
    w = torch.randn(32, generator=g).to(DEVICE)
    torch.testing.assert_close(TritonRMSNorm(w, 1e-5)(x), RMSNorm(w, 1e-5)(x), rtol=1e-5, atol=1e-5)
    assert TritonRMSNorm(w, 1e-5)(x[:0]).shape == (0, 32)


HEADS = [(4, 2, 16), (6, 1, 64), (3, 3, 24), (40, 8, 64)]  # (q heads, kv heads, head_dim); the last takes 2 programs


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rope_frac", [1, 2], ids=["full", "partial"])
@pytest.mark.parametrize("norms", ["qk", "none", "q"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
def test_qkv_matches_reference(neox, rope_frac, norms, heads):
    nh, nkv, hd = heads
    H = 40
    g = torch.Generator().manual_seed(2)
    wq, wk, wv = (TorchLinear(torch.randn(n * hd, H, generator=g).to(DEVICE) / 4) for n in (nh, nkv, nkv))
    qn = torch.randn(hd, generator=g).to(DEVICE) if "q" in norms else None
    kn = torch.randn(hd, generator=g).to(DEVICE) if "k" in norms else None
    rope = Rope(hd // rope_frac, 10000.0, neox, 64, DEVICE)
    args = (wq, wk, wv, qn, kn, rope, nh, nkv, hd, 1e-6)
    h = torch.randn(5, H, generator=g).to(DEVICE)
    meta = _meta(torch.tensor([0, 3, 17, 18, 63], device=DEVICE))
    got, want = TritonQKV(0, *args)(h, meta), QKVRope(*args)(h, meta)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _meta(positions: torch.Tensor, kv: KVCacheTensors | None = None,
          slots: torch.Tensor | None = None) -> AttentionMetadata:
    """One sequence's rows at `positions`, with a pool and the slots its k/v go to when given."""
    return replace(positions_metadata(positions), slot_mapping=slots, kv=kv)


@pytest.mark.parametrize("pool_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}-{h[1]}-{h[2]}")
def test_qkv_writes_kv_into_the_pool(heads, pool_dtype):
    """With a pool and a slot mapping, the kernel stores k (normed, rotated) and v at the rows' slots of its own
    layer, cast to the pool's dtype, and returns them as None; every other slot and layer is untouched."""
    nh, nkv, hd = heads
    H, T, layers, slots_total = 40, 5, 2, 12
    g = torch.Generator().manual_seed(4)
    wq, wk, wv = (TorchLinear(torch.randn(n * hd, H, generator=g).to(DEVICE) / 4) for n in (nh, nkv, nkv))
    args = (wq, wk, wv, torch.randn(hd, generator=g).to(DEVICE), torch.randn(hd, generator=g).to(DEVICE),
            Rope(hd, 10000.0, True, 64, DEVICE), nh, nkv, hd, 1e-6)
    h = torch.randn(T, H, generator=g).to(DEVICE)
    positions = torch.tensor([0, 3, 17, 18, 63], device=DEVICE)
    slots = torch.tensor([7, 0, 11, 2, 5], device=DEVICE)
    pool_k = torch.full((layers, slots_total, nkv, hd), 9.0, dtype=pool_dtype, device=DEVICE)
    pool_v = pool_k.clone()
    q, k, v = TritonQKV(1, *args)(h, _meta(positions, KVCacheTensors(pool_k, pool_v, 4), slots))
    want_q, want_k, want_v = QKVRope(*args)(h, _meta(positions))
    assert k is None and v is None
    torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pool_k[1, slots].float(), want_k.to(pool_dtype).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(pool_v[1, slots], want_v.to(pool_dtype))
    others = torch.ones(slots_total, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert (pool_k[1, others] == 9).all() and (pool_v[1, others] == 9).all()
    assert (pool_k[0] == 9).all() and (pool_v[0] == 9).all()


def test_qkv_with_no_tokens():
    g = torch.Generator().manual_seed(3)
    wq, wk, wv = (TorchLinear(torch.randn(n * 16, 8, generator=g).to(DEVICE)) for n in (2, 1, 1))
    rope = Rope(16, 10000.0, True, 8, DEVICE)
    q, k, v = TritonQKV(0, wq, wk, wv, None, None, rope, 2, 1, 16, 1e-6)(
        torch.empty(0, 8, device=DEVICE), _meta(torch.empty(0, dtype=torch.long, device=DEVICE)))
    assert q.shape == (0, 2, 16) and k.shape == v.shape == (0, 1, 16)


# --------------------------------------------------------------------------------------------
# q/k/v with the heads finished in the products' epilogue (packed weights, `TritonQKV.stack`)
# --------------------------------------------------------------------------------------------


def _packed_qkv(qtypes: tuple[QT, QT, QT], nh: int, nkv: int, hd: int, H: int, neox: bool, rope_dim: int,
                norms: str, seed: int) -> tuple:
    """TritonQKV built by the backend from packed q/k/v weights of `qtypes` (stacked as the backend stacks them),
    and the same projection's arguments with the reference's linears."""
    from moeserve.kernels.qlinear import ReferenceLinear
    from moeserve.kernels.triton.backend import TritonBackend

    rng = np.random.default_rng(seed)
    ws = [PackedTensor(f"w{i}", qt, (n * hd, H), torch.from_numpy(random_quant_bytes(qt, (n * hd, H), rng,
                                                                                    scale=H ** -0.5)).to(DEVICE))
          for i, (qt, n) in enumerate(zip(qtypes, (nh, nkv, nkv), strict=True))]
    g = torch.Generator().manual_seed(seed)
    qn = (1 + torch.randn(hd, generator=g) / 4).to(DEVICE) if "q" in norms else None
    kn = (1 + torch.randn(hd, generator=g) / 4).to(DEVICE) if "k" in norms else None
    rope = Rope(rope_dim, 10000.0, neox, 512, DEVICE)
    backend = TritonBackend(DEVICE)
    fast = backend.qkv(0, *(backend.linear(w) for w in ws), qn, kn, rope, nh, nkv, hd, 1e-6)
    ref_args = (*(ReferenceLinear(w) for w in ws), qn, kn, rope, nh, nkv, hd, 1e-6)
    return fast, ref_args


def _separate(fast: TritonQKV) -> TritonQKV:
    """The same projection finished by the separate QK-norm + RoPE kernel after the stacked product."""
    import copy

    other = copy.copy(fast)
    other.weights = []
    return other


EPILOGUE = [  # (q, k, v quant types, q heads, kv heads, head_dim, rows): a v of its own type is a 2nd weight
    ((QT.Q4_K, QT.Q4_K, QT.Q4_K), 4, 2, 128, 1),
    ((QT.Q4_K, QT.Q4_K, QT.Q6_K), 4, 2, 128, 3),
    ((QT.Q8_0, QT.Q8_0, QT.Q8_0), 6, 2, 64, 20),  # 64-row tiles
    ((QT.Q5_K, QT.Q5_K, QT.Q4_0), 2, 1, 64, 300),  # prefill tiles, one K split
]


@pytest.mark.parametrize("case", EPILOGUE, ids=lambda c: f"{c[0][0].name}-{c[0][2].name}-{c[1]}x{c[3]}-T{c[4]}")
@pytest.mark.parametrize("write", [False, True], ids=["returned", "pool"])
def test_qkv_epilogue_equals_the_separate_kernel(case, write):
    """The heads finished in the products' epilogue: bit for bit the separate kernel's q, k and v (same partial
    sums in the same order, same float32 math) — returned, or stored into the pool at the slots — and within the
    fp16-operand bound of the reference backend's projection; K splits forced to 1 and 2 give the same result."""
    qtypes, nh, nkv, hd, T = case
    H = 512  # two K steps of a decode tile: room for a split
    fast, ref_args = _packed_qkv(qtypes, nh, nkv, hd, H, True, hd, "qk", seed=T)
    assert len(fast.weights) == (1 if qtypes[1] == qtypes[2] else 2)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(T, H, generator=g).to(DEVICE)
    positions = torch.randint(0, 512, (T,), generator=g).to(DEVICE)
    slots = torch.randperm(T + 7, generator=g)[:T].to(DEVICE)

    def run(qkv: TritonQKV) -> tuple[torch.Tensor, ...]:
        if not write:
            return qkv(h, _meta(positions))
        pool = torch.full((2, T + 7, nkv, hd), 9.0, dtype=torch.float16, device=DEVICE)
        pool_v = pool.clone()
        q, k, v = qkv(h, _meta(positions, KVCacheTensors(pool, pool_v, 4), slots))
        assert k is None and v is None and (pool[1] == 9).all()  # layer 0 only
        return q, pool[0, slots], pool_v[0, slots]

    got = run(fast)
    for a, b in zip(got, run(_separate(fast)), strict=True):
        assert torch.equal(a, b)
    want = QKVRope(*ref_args)(h, _meta(positions))
    for a, b in zip(got, want, strict=True):
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < 4e-3
    for split in (1, 2):  # another summation order: float32 roundings, and an fp16 pool value may flip an ulp
        fast.split_k = split
        for a, b in zip(run(fast), got, strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rope_frac", [1, 2], ids=["full", "partial"])
@pytest.mark.parametrize("norms", ["qk", "none", "q"])
def test_qkv_epilogue_rope_and_norm_variants(neox, rope_frac, norms):
    """Every RoPE layout and norm combination through the epilogue, bit for bit the separate kernel."""
    fast, _ = _packed_qkv((QT.Q4_0,) * 3, 2, 1, 64, 64, neox, 64 // rope_frac, norms, seed=1)
    assert fast.weights
    g = torch.Generator().manual_seed(6)
    h = torch.randn(4, 64, generator=g).to(DEVICE)
    meta = _meta(torch.tensor([0, 5, 200, 511], device=DEVICE))
    for a, b in zip(fast(h, meta), _separate(fast)(h, meta), strict=True):
        assert torch.equal(a, b)


def test_qkv_epilogue_needs_whole_tiles():
    """A head_dim that is not whole 64-wide tiles, or a v the backend cannot pack with q/k, keeps the separate
    kernel."""
    assert not _packed_qkv((QT.Q8_0,) * 3, 2, 1, 32, 64, True, 32, "qk", seed=2)[0].weights
    fast, _ = _packed_qkv((QT.Q8_0, QT.Q8_0, QT.F16), 2, 1, 64, 64, True, 64, "qk", seed=3)
    assert fast.fused is not None and not fast.weights


# --------------------------------------------------------------------------------------------
# a decode step's norm taken by the kernel that consumes it (`PendingNorm`, `TritonBackend.fuse_norm`)
# --------------------------------------------------------------------------------------------


def test_a_linked_norm_is_left_pending_for_a_row_or_two():
    """`add_norm` of a linked norm hands back the residual stream's buffer and a `PendingNorm` for 1-2 rows (the
    consumer fills both), tensors from 3 rows on; `tensor()` is the separate kernel's norm and fills s."""
    from moeserve.kernels.triton.norm import FUSE_MAX_ROWS, PendingNorm

    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, generator=g).to(DEVICE)
    norm = TritonRMSNorm(w, 1e-6)
    norm.fuse = True
    for T in range(1, FUSE_MAX_ROWS + 2):
        x, delta = (torch.randn(T, 64, generator=g).to(DEVICE) for _ in range(2))
        s, h = norm.add_norm(x, delta)
        want_s, want_h = TritonRMSNorm(w, 1e-6).add_norm(x, delta)
        if T > FUSE_MAX_ROWS:
            assert torch.equal(s, want_s) and torch.equal(h, want_h)
            continue
        assert isinstance(h, PendingNorm) and h.s is s and h.shape == x.shape
        assert torch.equal(h.tensor(), want_h) and torch.equal(s, want_s)
        s0, h0 = norm.add_norm(x, None)
        assert torch.equal(s0, x) and torch.equal(h0.tensor(), TritonRMSNorm(w, 1e-6)(x))


@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("delta", [True, False], ids=["add", "first"])
def test_qkv_takes_its_pending_norm(T, delta):
    """The q/k/v launch with the attention norm left to it: q, the pool's k and v, and the residual stream it
    stores are bit for bit those of the norm kernel followed by the same launch."""
    from moeserve.kernels.triton.norm import PendingNorm

    H = 512
    fast, _ = _packed_qkv((QT.Q4_K, QT.Q4_K, QT.Q6_K), 4, 2, 128, H, True, 128, "qk", seed=8)
    assert fast.takes_pending_norm
    g = torch.Generator().manual_seed(9)
    x, d = (torch.randn(T, H, generator=g).to(DEVICE) for _ in range(2))
    w = (1 + torch.randn(H, generator=g) / 4).to(DEVICE)
    norm = TritonRMSNorm(w, 1e-6)
    positions = torch.tensor([5, 9][:T], device=DEVICE)
    slots = torch.tensor([3, 0][:T], device=DEVICE)

    def run(fuse: bool) -> tuple[torch.Tensor, ...]:
        norm.fuse = fuse
        s, h = norm.add_norm(x, d if delta else None)
        assert isinstance(h, PendingNorm) == fuse
        pool = torch.zeros((1, 4, 2, 128), dtype=torch.float16, device=DEVICE)
        pool_v = pool.clone()
        q, _, _ = fast(h, _meta(positions, KVCacheTensors(pool, pool_v, 4), slots))
        return q, pool, pool_v, s

    for a, b in zip(run(True), run(False), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 2])
def test_moe_takes_its_pending_norm(T):
    """The MoE's routing launch with the FFN norm left to it: the block's output and the residual stream are bit
    for bit those of the norm kernel followed by the block."""
    from moeserve.kernels.triton.backend import TritonBackend

    H, inter, E = 256, 256, 8
    rng = np.random.default_rng(10)

    def stack(qt: QT, shape: tuple[int, ...]) -> PackedTensor:
        raw = random_quant_bytes(qt, shape, rng, scale=shape[-1] ** -0.5)
        return PackedTensor("w", qt, shape, torch.from_numpy(raw).to(DEVICE))

    router = PackedTensor("r", QT.F32, (E, H), torch.randn(E, H).view(torch.uint8).reshape(E, H * 4).to(DEVICE))
    backend = TritonBackend(DEVICE)
    moe = backend.moe(router, stack(QT.Q4_K, (E, inter, H)), stack(QT.Q4_K, (E, inter, H)),
                      stack(QT.Q6_K, (E, H, inter)), 2, True)
    norm = TritonRMSNorm(torch.rand(H).to(DEVICE) + 0.5, 1e-6)
    backend.fuse_norm(norm, moe)
    assert norm.fuse
    g = torch.Generator().manual_seed(11)
    x, d = (torch.randn(T, H, generator=g).to(DEVICE) for _ in range(2))
    runs = []
    for fuse in (True, False):
        norm.fuse = fuse
        s, h = norm.add_norm(x, d)
        runs.append((moe(h), s))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_whole_model_is_the_same_with_decode_norms_fused(make_model):
    """A Q4_K_M-typed MoE model (q/k/v epilogue with a Q6_K v, fused routing): greedy tokens and their logprobs are
    bit-identical whether its decode steps leave the norms to the q/k/v and routing launches or run the norm
    kernel."""
    from moeserve import LLM, SamplingParams
    from tests.test_parity_hf import Q4KM

    path = make_model("fused-norm-q4km", n_layers=2, vocab_size=384, hidden_size=256, head_dim=128, n_heads=4,
                      n_kv_heads=2, n_experts=8, n_experts_used=2, expert_ffn=256, qtype=QT.Q4_K, qtypes=Q4KM)
    prompt = np.random.default_rng(4).integers(0, 250, 10).tolist()
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    runs = []
    for fuse in (True, False):
        llm = LLM(str(path), kernels="triton", device="cpu", warmup=False)
        norms = [n for b in llm.model.blocks for n in (b.attn_norm, b.ffn_norm)]
        assert all(n.fuse for n in norms)
        for n in norms:
            n.fuse = fuse
        out = llm.generate([prompt], sp)[0].outputs[0]
        runs.append((out.token_ids, out.logprobs))
    assert runs[0] == runs[1]
