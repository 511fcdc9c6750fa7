"""Native CPU kernels (moeserve.kernels.cpu, `torch.ops.moeserve.*`) against the float32 reference
`x @ dequantize(W).T`.

Every quantized type is checked on random valid blocks at m = 1, 2, 5, 7, 64 and 512 rows (the issue's
bound: max |error| <= 5e-3 * max |reference|): integer kernel for few rows, `mk_gemm` from the GEMM
threshold on. Its error is ~3e-5, so it is also held to a tight bound that would catch a real bug.

Nothing here is skipped: on a CPU with AVX2/FMA/F16C the library must build, and a failed build fails
these tests (NativeBuildError) instead of skipping them.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import dequantize, random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.cpu import build, native
from moeserve.kernels.metadata import positions_metadata
from moeserve.kernels.rope import Rope

QUANT = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS]
ROWS = (1, 2, 5, 7, 64, 512)  # 2, 5, 7: the multi-row integer dots (groups of 4 + remainders)
N, K = 256, 512
BOUND = 5e-3


def _weight(qt: QT, shape: tuple[int, ...], seed: int = 0) -> PackedTensor:
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(seed)))
    return PackedTensor("w", qt, shape, raw)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _ref_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w


def _check_linear(fn, w: PackedTensor, bound: float) -> list[float]:
    ref_w = dequantize(w.data, w.qtype, w.shape[-1])
    gen = torch.Generator().manual_seed(1)
    errs = []
    for m in ROWS:
        x = torch.randn(m, w.shape[-1], generator=gen)
        errs.append(_rel_err(fn(x), x @ ref_w.T))
    assert max(errs) <= bound, f"{QT(w.qtype).name}: errors {errs} exceed {bound}"
    return errs


def test_available_on_this_cpu() -> None:
    """On a CPU with the floor features the library builds and loads (else NativeBuildError, not False)."""
    assert native.available() == build.cpu_ok()
    if build.cpu_ok():
        assert build.isa() in ("avx2", "avx512vnni")
        assert hasattr(torch.ops.moeserve, "qmatmul")


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_native_linear(qt: QT) -> None:
    w = _weight(qt, (N, K))
    assert native.supports(w)
    fn = native.NativeLinear(w)
    errs = _check_linear(fn, w, BOUND)
    assert max(errs) < 2e-4  # 16-bit activations / exact dequant: far inside the bound


def test_native_linear_keeps_leading_dims_and_dtypes() -> None:
    w = _weight(QT.Q4_K, (N, K), seed=2)
    fn = native.NativeLinear(w)
    x = torch.randn(2, 3, K)
    y = fn(x)
    assert y.shape == (2, 3, N) and torch.equal(y, fn(x.reshape(6, K)).view(2, 3, N))
    xb = x.to(torch.bfloat16)
    assert torch.equal(fn(xb), fn(xb.float()))
    xt = torch.randn(K, 5).t()  # non-contiguous
    assert torch.equal(fn(xt), fn(xt.contiguous()))


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_embedding_rows_are_the_reference_rows(qt: QT) -> None:
    """The native embedding lookup dequantizes exactly the rows the reference lookup does, bit for bit."""
    w = _weight(qt, (N, K), seed=9)
    ids = torch.tensor([[0, 5, 5], [N - 1, 17, 3]])
    got = native.EmbeddingRows(w)(ids)
    assert got.shape == (2, 3, K) and torch.equal(got, w.rows(ids))


@pytest.mark.parametrize("m", [1, 3, 5, native.GEMM_MIN_ROWS])
def test_fused_linears_equal_separate_calls(m: int) -> None:
    """`FusedLinears` (one `qmatmul_multi` call for q/k/v-like projections of mixed types and sizes)
    gives bit-identical outputs to calling each native linear on its own."""
    ws = [_weight(QT.Q4_K, (N, K), seed=5), _weight(QT.Q6_K, (64, K), seed=6), _weight(QT.Q8_0, (96, K), seed=7)]
    lins = [native.NativeLinear(w) for w in ws]
    x = torch.randn(m, K)
    for got, lin in zip(native.FusedLinears(lins)(x), lins, strict=True):
        assert torch.equal(got, lin(x))


def _gemm(kind: str, w: PackedTensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.moeserve.qgemm(x, w.data, int(w.qtype), w.shape[-1], kind)


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [native.GEMM_MIN_ROWS, 17, 40])
def test_native_float_gemm_is_exact(qt: QT, m: int) -> None:
    """`mk_gemm_f32` multiplies the exact float32 weights: the only error left is float32 summation order.
    m = 17 and 40 exercise the 8-wide tail panel and a full one. It is `mk_gemm` for Q4_0..Q8_0."""
    w = _weight(qt, (N, K), seed=3)
    x = torch.randn(m, K)
    ref = (x.double() @ dequantize(w.data, qt, K).double().T).float()
    assert _rel_err(_gemm("f32", w, x), ref) < 5e-6  # (sequential float32 sums: ~1e-6)
    if qt not in native.KQUANTS:
        assert _rel_err(native.NativeLinear(w)(x), ref) < 5e-6


@pytest.mark.parametrize("qt", sorted(native.KQUANTS), ids=lambda q: q.name)
@pytest.mark.parametrize(("n", "m"), [(256, 1), (250, 5), (256, native.GEMM_MIN_ROWS_KQUANT), (250, 17), (64, 40),
                                      (40, 130)])
def test_native_integer_gemm_matches_reference(qt: QT, n: int, m: int) -> None:
    """`mk_gemm_i16` (the K-quants' `mk_gemm`: int16 q * scale tiles, 15-bit activations) against the float64
    product of the reference dequantizer's weights: the error is the activations' rounding (~2^-15 of each
    256-block's maximum, summed), here with one block 100x louder than the rest. Ragged shapes cover the
    padding of weight rows (tiles of 16, pairs) and activation rows (groups of 4, chunks of 16, calls of 64)."""
    w = _weight(qt, (n, K), seed=3)
    x = torch.randn(m, K)
    x[0, 256:512] *= 100
    ref = (x.double() @ dequantize(w.data, qt, K).double().T).float()
    got = _gemm("i16", w, x)
    for i in range(m):  # per row: each row has its own scale
        assert _rel_err(got[i], ref[i]) < 3e-4
    if m >= native.GEMM_MIN_ROWS_KQUANT:
        assert torch.equal(native.NativeLinear(w)(x), got)
    assert torch.equal(_gemm("auto", w, x), got)


@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K, QT.Q8_0], ids=lambda q: q.name)
def test_experts(qt: QT) -> None:
    w = _weight(qt, (4, 128, K), seed=7)
    fn = native.NativeExperts(w)
    assert fn.n_experts == 4
    ref_w = dequantize(w.data, qt, K)
    for e in range(4):
        for m in (1, 7, 64):
            x = torch.randn(m, K)
            assert _rel_err(fn(e, x), x @ ref_w[e].T) <= BOUND
            if m == 7:  # expert e of the stack is the 2-D weight W[e]
                single = native.NativeLinear(PackedTensor("e", qt, (128, K), w.data[e].contiguous()))
                assert torch.equal(fn(e, x), single(x))
    with pytest.raises(RuntimeError, match="expert 4 out of range"):
        fn(4, torch.randn(1, K))


def test_odd_shapes_are_not_supported() -> None:
    """K not a multiple of 256 (allowed for 32-blocks) cannot use the native kernels: `supports` says so,
    and the operator refuses such a weight with a clear error instead of reading past a row."""
    w = _weight(QT.Q8_0, (80, 96))
    assert not native.supports(w)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.moeserve.qmatmul(torch.randn(2, 96), w.data, int(QT.Q8_0), 96, 12)
    assert not native.supports(_weight(QT.F16, (64, 256)))


def test_ops_check_their_arguments() -> None:
    """Wrong dtypes, shapes, row sizes or types raise RuntimeError naming the op, never crash."""
    w = _weight(QT.Q4_K, (64, 256))
    op = torch.ops.moeserve.qmatmul
    with pytest.raises(RuntimeError, match="qmatmul: x must be float32"):
        op(torch.randn(1, 256, dtype=torch.float64), w.data, int(QT.Q4_K), 256, 4)
    with pytest.raises(RuntimeError, match="qmatmul: x has 512 columns"):
        op(torch.randn(1, 512), w.data, int(QT.Q4_K), 256, 4)
    with pytest.raises(RuntimeError, match="rows are 144 bytes, expected 210"):
        op(torch.randn(1, 256), w.data, int(QT.Q6_K), 256, 4)
    with pytest.raises(RuntimeError, match="no native kernel"):
        op(torch.randn(1, 256), w.data, int(QT.F16), 256, 4)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(torch.randn(256, 2).t(), w.data, int(QT.Q4_K), 256, 4)
    with pytest.raises(RuntimeError, match="expert index needs a 3-D"):
        op(torch.randn(1, 256), w.data, int(QT.Q4_K), 256, 4, 0)
    with pytest.raises(RuntimeError, match="qgemm: kind must be"):
        torch.ops.moeserve.qgemm(torch.randn(1, 256), w.data, int(QT.Q4_K), 256, "f64")
    with pytest.raises(RuntimeError, match="Q2_K..Q6_K and IQ4_XS only"):
        torch.ops.moeserve.qgemm(torch.randn(1, 256), _weight(QT.Q8_0, (8, 256)).data, int(QT.Q8_0), 256, "i16")
    with pytest.raises(RuntimeError, match="argmax: x has no columns"):
        torch.ops.moeserve.argmax(torch.empty(2, 0))


def test_native_gemm_ragged_rows() -> None:
    """Float32 GEMM: weight rows not a multiple of the tile (24) or micro-kernel (6) height: 250 = 10 * 24 + 10."""
    w = _weight(QT.Q8_0, (250, K), seed=9)
    x = torch.randn(native.GEMM_MIN_ROWS + 1, K)
    ref = x @ dequantize(w.data, QT.Q8_0, K).T
    assert _rel_err(native.NativeLinear(w)(x), ref) < 5e-6


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rope_dim", [128, 64])
@pytest.mark.parametrize("with_norm", [True, False])
def test_native_norm_rope_matches_reference(neox: bool, rope_dim: int, with_norm: bool) -> None:
    """`norm_rope_` == rms_norm + `Rope` (partial RoPE, both layouts, the table's last position)."""
    rope = Rope(rope_dim, 1e6, neox, max_pos=128)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 4, 128, generator=g), torch.randn(128, generator=g)
    pos = torch.tensor([0, 3, 63, 127, 7])
    ref = rope(_ref_rms_norm(x, w, 1e-6) if with_norm else x, pos)
    xx = x.clone()
    got = native.NormRope(rope, 1e-6)(xx, w if with_norm else None, pos)
    assert got.data_ptr() == xx.data_ptr()  # in place
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-6), _ref_rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)


def test_native_norm_rope_rejects_positions_outside_the_table() -> None:
    """The RoPE tables are fixed: a position past them (or negative) raises a clear error, never reads outside."""
    rope = Rope(64, 1e6, True, max_pos=64)
    nr = native.NormRope(rope, 1e-6)
    for bad in (64, 1000, -1):
        with pytest.raises(RuntimeError, match=f"position {bad} is outside the RoPE tables \\(64 positions\\)"):
            nr(torch.randn(2, 4, 64), None, torch.tensor([0, bad]))
    with pytest.raises(RuntimeError, match="positions for"):
        nr(torch.randn(2, 4, 64), None, torch.tensor([0, 1, 2]))


def test_rms_norm_and_argmax_decline_what_they_do_not_cover() -> None:
    x, w = torch.randn(3, 64), torch.randn(64)
    assert native.rms_norm(x.double(), w, 1e-6) is None
    assert native.rms_norm(x, torch.randn(32), 1e-6) is None
    assert native.argmax(x.double()) is None and native.argmax(torch.randn(4)) is None


@pytest.mark.parametrize("window", [None, 7])
def test_native_decode_attention_matches_reference(window: int | None) -> None:
    """`attn_decode` == torch SDPA for one query per sequence: GQA (32 query / 4 KV heads), a batch of
    sequences of different lengths padded to the longest (padding = NaN, never read), sliding window."""
    from moeserve.kernels.attention import gqa_attention

    g = torch.Generator().manual_seed(2)
    lens = [1, 9, 40, 333]
    L = max(lens)
    q = torch.randn(len(lens), 32, 128, generator=g)
    k, v = torch.full((len(lens), L, 4, 128), float("nan")), torch.full((len(lens), L, 4, 128), float("nan"))
    refs = []
    for b, n in enumerate(lens):
        k[b, :n], v[b, :n] = torch.randn(n, 4, 128, generator=g), torch.randn(n, 4, 128, generator=g)
        refs.append(gqa_attention(q[b:b + 1], k[b, :n], v[b, :n], n - 1, window))
    got = native.attn_decode(q, k, v, torch.tensor(lens), window)
    assert got is not None
    torch.testing.assert_close(got, torch.cat(refs), rtol=1e-4, atol=1e-5)


def test_native_paged_decode_attention_and_declines() -> None:
    """Paged: the same answer as the padded layout when the blocks are scattered in a pool; a length past
    the table or a block id outside the pool declines (None: the caller falls back) instead of reading out."""
    g = torch.Generator().manual_seed(4)
    B, nh, nkv, hd, bs = 2, 8, 2, 64, 4
    lens = torch.tensor([5, 11])
    q = torch.randn(B, nh, hd, generator=g)
    kp, vp = torch.randn(B, 12, nkv, hd, generator=g), torch.randn(B, 12, nkv, hd, generator=g)
    want = native.attn_decode(q, kp, vp, lens)
    table = torch.tensor([[6, 1, 4], [0, 3, 5]])
    pool_k, pool_v = torch.full((8 * bs, nkv, hd), float("nan")), torch.full((8 * bs, nkv, hd), float("nan"))
    for b in range(B):
        for j in range(3):
            s = table[b, j] * bs
            pool_k[s:s + bs], pool_v[s:s + bs] = kp[b, j * bs:(j + 1) * bs], vp[b, j * bs:(j + 1) * bs]
    got = native.attn_decode(q, pool_k, pool_v, lens, table=table, block_size=bs)
    assert got is not None and torch.equal(got, want)
    assert native.attn_decode(q, pool_k, pool_v, torch.tensor([5, 13]), table=table, block_size=bs) is None
    assert native.attn_decode(q, pool_k, pool_v, lens, table=torch.tensor([[6, 1, 4], [0, 3, 8]]),
                              block_size=bs) is None
    assert native.attn_decode(q, pool_k, pool_v, lens, table=table, block_size=0) is None
    assert native.attn_decode(q.double(), kp, vp, lens) is None


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_native_dequant_is_bit_exact(qt: QT) -> None:
    """The tiles `mk_gemm` multiplies hold exactly the reference dequantizer's float32 weights."""
    w = _weight(qt, (N, K), seed=4)
    out = torch.ops.moeserve.dequant_rows(w.data, int(qt), K)
    assert torch.equal(out, dequantize(w.data, qt, K))


def test_native_argmax_matches_torch() -> None:
    """Same answer as torch.argmax: first index on ties, first NaN when there is one, odd widths."""
    x = torch.randn(5, 1003)
    x[1, 7] = x[1, 900] = 50.0  # tie: the first wins
    x[2, 10], x[2, 20] = float("nan"), float("inf")  # NaN beats everything
    x[3] = float("-inf")
    x[4, 1002] = 99.0  # in the scalar tail
    assert torch.equal(native.argmax(x), torch.argmax(x, dim=-1))


def test_native_attention_propagates_nan_like_torch() -> None:
    """A NaN in a key that is read poisons that KV head's query heads, as in torch; others stay finite."""
    from moeserve.kernels.attention import decode_attention

    q, k, v = torch.randn(1, 8, 64), torch.randn(1, 20, 2, 64), torch.randn(1, 20, 2, 64)
    k[0, 5, 1, 3] = float("nan")
    got = native.attn_decode(q, k, v, torch.tensor([20])).view(1, 8, 64)
    ref = decode_attention(q, k, v, torch.tensor([19]), None).view(1, 8, 64)
    assert torch.equal(got.isnan(), ref.isnan()) and got[0, 4:].isnan().all() and not got[0, :4].isnan().any()


def _qkv(m: int) -> tuple[native.QKVRope, list[native.NativeLinear], Rope, torch.Tensor, torch.Tensor]:
    nh, nkv, hd = 4, 2, 128
    ws = [_weight(QT.Q4_K, (nh * hd, K), seed=11), _weight(QT.Q4_K, (nkv * hd, K), seed=12),
          _weight(QT.Q6_K, (nkv * hd, K), seed=13)]
    lins = [native.NativeLinear(w) for w in ws]
    g = torch.Generator().manual_seed(2)
    qn, kn = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    rope = Rope(hd, 1e6, True, max_pos=128)
    fused = native.QKVRope(native.FusedLinears(lins), native.NormRope(rope, 1e-6), qn, kn, nh, nkv, hd)
    return fused, lins, rope, qn, kn


@pytest.mark.parametrize("m", [1, 3, native.GEMM_MIN_ROWS_KQUANT, native.GEMM_MIN_ROWS])
def test_qkv_rope_equals_projections_then_norm_rope(m: int) -> None:
    """`QKVRope` (one `qkv_rope` call at decode; FusedLinears + NormRope from the GEMM threshold on) gives
    bit-identical q, k, v to the separate native projections followed by `NormRope`."""
    fused, lins, rope, qn, kn = _qkv(m)
    nh, nkv, hd = 4, 2, 128
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(90, 90 + m)
    q, k, v = fused(x, positions_metadata(pos))
    norm_rope = native.NormRope(rope, 1e-6)
    assert torch.equal(q, norm_rope(lins[0](x).view(m, nh, hd), qn, pos))
    assert torch.equal(k, norm_rope(lins[1](x).view(m, nkv, hd), kn, pos))
    assert torch.equal(v, lins[2](x).view(m, nkv, hd))


def test_qkv_rope_rejects_positions_outside_the_table() -> None:
    fused, *_ = _qkv(1)
    with pytest.raises(RuntimeError, match="position 128 is outside the RoPE tables"):
        fused(torch.randn(1, K), positions_metadata(torch.tensor([128])))


def _hammer(fn, n_threads: int = 2, iters: int = 40) -> list[list]:
    """Run fn(i) for i < iters on each of n_threads threads at once; each thread's results in order."""
    barrier = threading.Barrier(n_threads)
    results: list[list] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(iters):
                results[t].append(fn(i))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


def test_kernel_objects_are_reentrant() -> None:
    """Two threads calling the same NativeLinear / FusedLinears / QKVRope objects concurrently, with inputs of
    different sizes (so that one thread's outputs would land in the other's buffers if any state were shared),
    get exactly the single-threaded results."""
    w = _weight(QT.Q4_K, (N, K), seed=21)
    lin = native.NativeLinear(w)
    fl = native.FusedLinears([lin, native.NativeLinear(_weight(QT.Q8_0, (64, K), seed=22))])
    qkv, *_ = _qkv(1)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1 + i % 3, K, generator=g) for i in range(8)]
    positions = [torch.arange(10 * i, 10 * i + x.shape[0]) for i, x in enumerate(xs)]

    def step(i: int):
        x, pos = xs[i % len(xs)], positions[i % len(xs)]
        return lin(x), fl(x), qkv(x, positions_metadata(pos))

    want = [step(i) for i in range(len(xs))]
    for per_thread in _hammer(step):
        for i, got in enumerate(per_thread):
            ref = want[i % len(xs)]
            assert torch.equal(got[0], ref[0])
            assert all(torch.equal(a, b) for a, b in zip(got[1], ref[1], strict=True))
            assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2], strict=True))
