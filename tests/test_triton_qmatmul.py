"""Triton repack and quantized matmul (moeserve.kernels.triton.packing / qmatmul) against the reference.

* The repack is exact: the kernels' own dequantizer on the packed arrays reproduces `quants.dequantize`
  (bit for bit under the interpreter; ~1e-6 where a GPU fuses multiply-adds), for matrices and expert
  stacks of every quant type and of F16/BF16 (float expert stacks), and the packed arrays take at most 10%
  more bytes than the file.
* `qmatmul` for every quant type at M = 1, 3 (one 16-row tile, split-K), 37 and 300 (tiled GEMM), with
  N not a multiple of BLOCK_N and K with both even and odd numbers of groups: within 2e-3 * max |y| of
  the float32 reference, and within 1e-5 of the same product on fp16-rounded operands (so only the
  fp16 operands the tensor cores take separate it from the reference, not a dequantization slip); BF16
  weights: of the product with x rounded to TF32 (their TF32 product).
* IQ4's code -> grid value lookup (a rounded quartic, no table) gives `quants.IQ4_VALUES` for all 16 codes, with
  and without fused multiply-adds.
* `TritonEmbedding` (the step's rows, one launch) equal to `PackedTensor.rows`, for every packed type.
* `TritonLinear`: leading dims, dtypes, non-contiguous input, bias, and the F32/F16/BF16 path.
* Inputs past fp16's range (a down projection's SwiGLU product): `qmatmul(wide=True)` (TF32) and an F16
  weight's row scaling stay finite and within the bound where fp16 operands overflow to inf; the triton
  backend's dense MLP asks its down projection for them at load.

Without a GPU the kernels run under Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

from moeserve.gguf.quants import IQ4_VALUES, dequantize, random_quant_bytes  # noqa: E402
from moeserve.gguf.reader import PackedTensor  # noqa: E402
from moeserve.kernels.qlinear import reference_matmul  # noqa: E402
from moeserve.kernels.triton import qmatmul as qm  # noqa: E402
from moeserve.kernels.triton.packing import pack_weight  # noqa: E402
from moeserve.kernels.triton.qmatmul import (  # noqa: E402
    TritonEmbedding,
    TritonLinear,
    counters,
    dequantize_packed,
    qmatmul,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 80  # not a multiple of any BLOCK_N
# K per type: 32-weight types get 12 blocks (several groups per K step) or 13 (one group per step). Float expert
# stacks are packed too (32-weight groups, no scales).
K = {QT.Q4_0: 384, QT.Q4_1: 416, QT.Q5_0: 416, QT.Q5_1: 384, QT.Q8_0: 416, QT.Q2_K: 768, QT.Q3_K: 512, QT.Q4_K: 768,
     QT.Q5_K: 512, QT.Q6_K: 768, QT.IQ4_NL: 416, QT.IQ4_XS: 512, QT.F16: 416, QT.BF16: 384}
QUANT = list(K)
BOUND = 2e-3


def _weight(qt: QT, shape: tuple[int, ...], seed: int = 0) -> PackedTensor:
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(seed), scale=shape[-1] ** -0.5))
    return PackedTensor("w", qt, shape, raw.to(DEVICE))


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 x rounded to TF32's 10-bit mantissa as the kernels round it (`qmatmul._tf32`)."""
    return ((x.float().contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(N, 0), (3, 40, 0)], ids=["matrix", "stack"])
def test_pack_is_exact(qt: QT, shape: tuple[int, ...]) -> None:
    shape = (*shape[:-1], K[qt])
    w = _weight(qt, shape, seed=1)
    pw = pack_weight(w)
    assert pw.rows == np.prod(shape[:-1]) and pw.cols == K[qt]
    assert w.nbytes <= pw.nbytes <= 1.1 * w.nbytes
    ref = dequantize(w.data, qt, K[qt]).reshape(pw.rows, K[qt])
    got = dequantize_packed(pw)
    if DEVICE == "cpu":
        assert torch.equal(got, ref)
    else:
        assert _rel(got, ref) <= 1e-6


@triton.jit
def _iq4_grid_kernel(out_ptr, STEP: tl.constexpr):
    codes = tl.arange(0, 16)
    tl.store(out_ptr + codes, qm._iq4_grid(codes.to(tl.float32) * STEP, STEP) - qm._IQ4_BIAS)


@pytest.mark.parametrize("step", [1, 16], ids=["low_nibble", "high_nibble"])
def test_iq4_grid_is_the_table(step: int) -> None:
    """`_iq4_grid` (IQ4's code -> value lookup: a quartic rounded by adding 1.5 * 2^23) gives IQ4_VALUES exactly for
    all 16 codes, taking the code as it is or 16x (the high nibble); and so does the quartic in float32 without FMAs
    (each multiply and add rounded): the margin to the rounding (0.06) does not hang on how it is evaluated."""
    out = torch.empty(16, device=DEVICE)
    _iq4_grid_kernel[(1,)](out, STEP=step)
    values = torch.tensor(IQ4_VALUES, dtype=torch.float32)
    assert torch.equal(out.cpu(), values)
    f = np.arange(16, dtype=np.float32) * np.float32(step)
    t = np.float32(qm._IQ4_C4.value / step**4)
    for k, c in ((3, qm._IQ4_C3), (2, qm._IQ4_C2), (1, qm._IQ4_C1), (0, qm._IQ4_BIAS.value - 127.0)):
        t = t * f + np.float32(c.value / step**k if k else c)
    assert np.array_equal(t - np.float32(qm._IQ4_BIAS.value), values.numpy())


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_embedding_rows_match_reference(qt: QT) -> None:
    """`TritonEmbedding`: the rows asked for (repeated, any order, a [B, T] batch) equal `PackedTensor.rows`."""
    w = _weight(qt, (N, K[qt]), seed=4)
    emb = TritonEmbedding(w)
    for ids in ([0], [N - 1, 3, 3, 0, 41], list(range(N - 1, -1, -2)), []):
        t = torch.tensor(ids, dtype=torch.long, device=DEVICE)
        got, ref = emb(t), w.rows(t)
        assert got.shape == (len(ids), K[qt])
        assert torch.equal(got, ref) if DEVICE == "cpu" or not ids else _rel(got, ref) <= 1e-6
    batch = torch.tensor([[1, 2], [79, 0]], device=DEVICE)
    assert emb(batch).shape == (2, 2, K[qt]) and torch.equal(emb(batch)[1, 0], emb(batch[1, :1])[0])


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 3, 37, 300])
def test_qmatmul_matches_reference(qt: QT, m: int) -> None:
    w = _weight(qt, (N, K[qt]), seed=2)
    pw = pack_weight(w)
    x = torch.randn(m, K[qt], generator=torch.Generator().manual_seed(m)).to(DEVICE)
    y = qmatmul(x, pw)
    assert _rel(y, reference_matmul(x, w.data, w)) <= BOUND
    if qt == QT.BF16:  # a TF32 product: x rounded to TF32 in the kernel, bf16 weights exact in it
        assert _rel(y, _tf32(x) @ dequantize(w.data, qt, K[qt]).T) <= 1e-5
        return
    w16 = dequantize(w.data, qt, K[qt]).half().float()
    assert _rel(y, x.half().float() @ w16.T) <= 1e-5


@pytest.mark.parametrize("m", [2, 37])
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q8_0], ids=lambda q: q.name)
def test_split_k_adds_up(qt: QT, m: int) -> None:
    """Split-K partial sums (one per K range) add up to the unsplit product, for the decode tiles (2 rows) and
    the GEMM tiles of batched decode (37 rows); a split that does not divide the K steps is refused rather than
    silently dropping columns."""
    pw = pack_weight(_weight(qt, (N, 1024), seed=3))
    x = torch.randn(m, 1024).to(DEVICE)
    whole = qmatmul(x, pw, split_k=1)
    for s in (2, 4):
        y = qmatmul(x, pw, split_k=s)
        assert _rel(y, whole) <= 1e-5  # float32 summation order
        assert torch.equal(qmatmul(x, pw, split_k=s), y)  # the last split adds the partials in a fixed order
        assert not counters(0, torch.device(DEVICE), "qmatmul").any()  # every tile's counter is reset
    with pytest.raises(ValueError, match="split_k"):
        qmatmul(x, pw, split_k=3)


def test_linear_shapes_dtypes_and_bias() -> None:
    w = _weight(QT.Q4_K, (N, 512), seed=4)
    bias = torch.randn(N).to(DEVICE)
    lin = TritonLinear(w, bias)
    assert (lin.in_features, lin.out_features) == (512, N)
    x = torch.randn(2, 3, 512).to(DEVICE)
    y = lin(x)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    ref = reference_matmul(x.reshape(6, 512), w.data, w) + bias
    assert _rel(y.reshape(6, N), ref) <= BOUND
    assert torch.equal(lin(x.half()), y)  # the kernel takes fp16 activations in any case
    assert _rel(lin(x.to(torch.bfloat16)), y) <= 1e-2
    xt = torch.randn(512, 5).to(DEVICE).t()  # non-contiguous rows
    assert torch.equal(lin(xt), lin(xt.contiguous()))
    assert lin(torch.empty(0, 512, device=DEVICE)).shape == (0, N)


@pytest.mark.parametrize("qt", [QT.F32, QT.F16, QT.BF16], ids=lambda q: q.name)
def test_linear_float_weights(qt: QT) -> None:
    w = _weight(qt, (N, 64), seed=5)
    x = torch.randn(3, 64).to(DEVICE)
    # exact float32 off the GPU; cuBLAS in the weight's dtype on it (bf16/fp16 activations)
    assert _rel(TritonLinear(w)(x), reference_matmul(x, w.data, w)) <= (1e-6 if DEVICE == "cpu" else 1e-2)


def test_stacked_linears_equal_their_parts() -> None:
    """q/k/v stacked into one packed weight (one launch) give exactly the separate outputs side by side; mixed
    types or a bias are not stacked."""
    rng = np.random.default_rng(5)
    parts = [TritonLinear(PackedTensor(f"w{i}", QT.Q4_K, (n, 256),
                                       torch.from_numpy(random_quant_bytes(QT.Q4_K, (n, 256), rng)).to(DEVICE)))
             for i, n in enumerate((64, 32, 32))]
    fused = TritonLinear.stacked(parts)
    assert fused is not None and (fused.out_features, fused.in_features) == (128, 256)
    x = torch.randn(3, 256, device=DEVICE)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=1), rtol=1e-6, atol=1e-6)
    other = TritonLinear(PackedTensor("v", QT.Q6_K, (32, 256),
                                      torch.from_numpy(random_quant_bytes(QT.Q6_K, (32, 256), rng)).to(DEVICE)))
    assert TritonLinear.stacked([parts[0], other]) is None


FP16_MAX = 65504.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's inf - inf in the fp16 product
@pytest.mark.parametrize("m", [1, 37, 300])
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K, QT.Q8_0], ids=lambda q: q.name)
def test_wide_inputs_past_fp16_range(qt: QT, m: int) -> None:
    """x far past fp16's 65,504 (real checkpoints' "massive activations" in the SwiGLU product): the fp16
    operands overflow to inf, the TF32 product (`wide`) stays within the bound of the reference — in the decode
    tile (SWAP, split-K), the batched-decode GEMM tile and the prefill tile; and on ordinary inputs it agrees
    with the fp16 product within the rounding of their 10-bit mantissas."""
    w = _weight(qt, (N, K[qt]), seed=6)
    pw = pack_weight(w)
    x = torch.randn(m, K[qt], generator=torch.Generator().manual_seed(m)).to(DEVICE)
    big = x * 1e6
    assert big.abs().max() > FP16_MAX
    y = qmatmul(big, pw, wide=True)
    assert torch.isfinite(y).all() and _rel(y, reference_matmul(big, w.data, w)) <= BOUND
    assert not torch.isfinite(qmatmul(big, pw)).all()  # why `wide` exists
    assert _rel(qmatmul(x, pw, wide=True), qmatmul(x, pw)) <= 2e-3


def test_float16_weight_rows_scaled_into_range() -> None:
    """An F16 weight on the GPU multiplies in fp16 (cuBLAS): for wide inputs each row is scaled by a power of
    two into range and back, exact in float32 — finite where the plain fp16 product overflows, equal to it
    where no row passes 1."""
    from moeserve.kernels.dense import DenseLinear
    from moeserve.kernels.triton.qmatmul import _range_scaled

    w = torch.randn(N, 64, generator=torch.Generator().manual_seed(7)).half()
    lin = DenseLinear(w)  # fp16 operands, as on the GPU
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(8)) * 3e5
    ref = x @ w.float().T
    assert not torch.isfinite(lin(x)).all()
    y = _range_scaled(lin, x)
    assert torch.isfinite(y).all() and _rel(y, ref) <= 2e-3
    small = torch.rand(5, 64) * 0.5
    assert torch.equal(_range_scaled(lin, small), lin(small))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # sigmoid of a huge gate: 0, exact
def test_backend_mlp_widens_its_down_projection() -> None:
    """`TritonBackend.mlp` (the dense FFN, at load: `mlp.TritonMLP`) has its down projection take wide inputs: a
    SwiGLU product past fp16's range goes through the block finite, within the bound of the reference MLP."""
    from moeserve.kernels.reference import ReferenceBackend
    from moeserve.kernels.triton.backend import TritonBackend

    hidden, inter = 256, 512
    ws = [_weight(QT.Q4_K, shape, seed=s) for s, shape in ((9, (inter, hidden)), (10, (inter, hidden)),
                                                            (11, (hidden, inter)))]
    backend = TritonBackend(DEVICE)
    mlp = backend.mlp(*(backend.linear(w) for w in ws))
    ref = ReferenceBackend(DEVICE).mlp(*(ReferenceBackend(DEVICE).linear(w) for w in ws))
    h = torch.randn(3, hidden, generator=torch.Generator().manual_seed(12)).to(DEVICE) * 600
    act = torch.nn.functional.silu(ref.gate(h)) * ref.up(h)
    assert act.abs().max() > FP16_MAX
    y = mlp(h)
    assert torch.isfinite(y).all() and _rel(y, ref(h)) <= BOUND


def test_triton_mlp_stacks_gate_up_and_rounds_once() -> None:
    """`TritonMLP`: gate|up as one product when they share a type (else two), SiLU·mul in one kernel whose float32
    output is rounded to TF32 for the packed down (`round_tf32`, as the kernels round) and left as is for a float
    down; both layouts give the reference MLP's output within the bound, and the stacked one equals the separate
    one (the same products side by side)."""
    from moeserve.kernels.reference import ReferenceBackend
    from moeserve.kernels.triton.backend import TritonBackend
    from moeserve.kernels.triton.mlp import TritonMLP, silu_mul

    hidden, inter = 256, 512
    backend, ref_backend = TritonBackend(DEVICE), ReferenceBackend(DEVICE)
    g = torch.randn(5, inter, generator=torch.Generator().manual_seed(13)).to(DEVICE) * 8
    u = torch.randn(5, inter, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    plain = torch.nn.functional.silu(g) * u
    assert _rel(silu_mul(g, u, False), plain) <= 1e-6
    assert torch.equal(silu_mul(g, u, True), _tf32(silu_mul(g, u, False)))
    h = torch.randn(4, hidden, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    for up_type, down_type in ((QT.Q4_K, QT.Q6_K), (QT.Q8_0, QT.F32)):
        ws = [_weight(qt, shape, seed=s) for s, qt, shape in ((16, QT.Q4_K, (inter, hidden)),
                                                               (17, up_type, (inter, hidden)),
                                                               (18, down_type, (hidden, inter)))]
        mlp = backend.mlp(*(backend.linear(w) for w in ws))
        assert isinstance(mlp, TritonMLP) and (mlp.gate_up is not None) == (up_type == QT.Q4_K)
        assert mlp.round == (down_type != QT.F32)
        ref = ref_backend.mlp(*(ref_backend.linear(w) for w in ws))
        y = mlp(h)
        assert y.shape == (4, hidden) and _rel(y, ref(h)) <= BOUND
        if mlp.gate_up is not None:
            separate = TritonMLP(mlp.gate, mlp.up, mlp.down)
            separate.gate_up = None
            assert _rel(separate(h), y) <= 1e-6
