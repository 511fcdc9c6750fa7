"""Fast kernels (moeserve.kernels.fast) against the float32 reference `x @ dequantize(W).T`.

Every quantized type is checked on random valid blocks at m = 1, 7, 64 and 512 rows (the issue's
bound: max |error| <= 5e-3 * max |reference|), through both backends:

* native (default where it builds): integer kernel for m < 8, exact dequant + GEMM for m >= 8;
  its error is ~3e-5, so it is also held to a tight bound that would catch a real bug.
* int4 (torch `_weight_int4pack_mm_for_cpu`, the fallback): bf16 activations, scales and
  outputs. Its error on random blocks reaches ~5e-3 for the affine types (Q4_1, Q4_K, Q5_1,
  Q5_K: the bf16-rounded scale multiplies codes up to 15-31 while the weight itself is the small
  difference q*s - m), so it is held to 1e-2; the exactness of the mapping itself is checked
  separately by emulating the kernel in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import dequantize, random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels import fast
from moeserve.kernels.fast import INT4_TYPES, int4pack, make_experts, make_linear, native
from moeserve.kernels.fast.dense import DenseLinear
from moeserve.kernels.fast.int4pack import Int4Experts, Int4Linear
from moeserve.kernels.qlinear import QExperts, QLinear

QUANT = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
FLOATS = [QT.F32, QT.F16, QT.BF16]
ROWS = (1, 2, 5, 7, 64, 512)  # 2, 5, 7: the multi-row integer dots (groups of 4 + remainders)
N, K = 256, 512
BOUND = 5e-3

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built on this machine")


def _weight(qt: QT, shape: tuple[int, ...], seed: int = 0) -> PackedTensor:
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(seed)))
    return PackedTensor("w", qt, shape, raw)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert y.dtype == torch.float32 and y.shape == ref.shape
    return ((y - ref).abs().max() / ref.abs().max()).item()


def _check_linear(fn, w: PackedTensor, bound: float) -> list[float]:
    ref_w = dequantize(w.data, w.qtype, w.shape[-1])
    gen = torch.Generator().manual_seed(1)
    errs = []
    for m in ROWS:
        x = torch.randn(m, w.shape[-1], generator=gen)
        errs.append(_rel_err(fn(x), x @ ref_w.T))
    assert max(errs) <= bound, f"{QT(w.qtype).name}: errors {errs} exceed {bound}"
    return errs


@needs_native
@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_native_linear(qt: QT) -> None:
    w = _weight(qt, (N, K))
    fn = make_linear(w, "native")
    assert isinstance(fn, native.NativeLinear)
    errs = _check_linear(fn, w, BOUND)
    assert max(errs) < 2e-4  # 16-bit activations / exact dequant: far inside the bound


@needs_native
@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_embedding_rows_are_the_reference_rows(qt: QT) -> None:
    """The native embedding lookup dequantizes exactly the rows the reference lookup does, bit for bit."""
    w = _weight(qt, (N, K), seed=9)
    ids = torch.tensor([[0, 5, 5], [N - 1, 17, 3]])
    got = native.EmbeddingRows(w)(ids)
    assert got.shape == (2, 3, K) and torch.equal(got, w.rows(ids))


@needs_native
@pytest.mark.parametrize("m", [1, 3, 5, native.GEMM_MIN_ROWS])
def test_fused_linears_equal_separate_calls(m: int) -> None:
    """`FusedLinears` (one `mk_matmul_multi` call for q/k/v-like projections of mixed types and sizes)
    gives bit-identical outputs to calling each native linear on its own."""
    ws = [_weight(QT.Q4_K, (N, K), seed=5), _weight(QT.Q6_K, (64, K), seed=6), _weight(QT.Q8_0, (96, K), seed=7)]
    lins = [make_linear(w, "native") for w in ws]
    x = torch.randn(m, K)
    for got, lin in zip(native.FusedLinears(lins)(x), lins, strict=True):
        assert torch.equal(got, lin(x))


def _gemm(fn: str, w: PackedTensor, x: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    y = torch.empty(x.shape[0], n)
    assert getattr(native.library(), fn)(int(w.qtype), w.data.data_ptr(), w.data.shape[-1], n, k, x.data_ptr(),
                                         x.shape[0], y.data_ptr(), 2) == 0
    return y


@needs_native
@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [native.GEMM_MIN_ROWS, 17, 40])
def test_native_float_gemm_is_exact(qt: QT, m: int) -> None:
    """`mk_gemm_f32` multiplies the exact float32 weights: the only error left is float32 summation order.
    m = 17 and 40 exercise the 8-wide tail panel and a full one. It is `mk_gemm` for Q4_0..Q8_0."""
    w = _weight(qt, (N, K), seed=3)
    x = torch.randn(m, K)
    ref = (x.double() @ dequantize(w.data, qt, K).double().T).float()
    assert _rel_err(_gemm("mk_gemm_f32", w, x), ref) < 5e-6  # (sequential float32 sums: ~1e-6)
    if qt not in native.KQUANTS:
        assert _rel_err(make_linear(w, "native")(x), ref) < 5e-6


@needs_native
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
    got = _gemm("mk_gemm_i16", w, x)
    for i in range(m):  # per row: each row has its own scale
        assert _rel_err(got[i], ref[i]) < 3e-4
    if m >= native.GEMM_MIN_ROWS_KQUANT:
        assert torch.equal(make_linear(w, "native")(x), got)


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_int4_linear(qt: QT) -> None:
    w = _weight(qt, (N, K))
    fn = make_linear(w, "int4")
    assert isinstance(fn, Int4Linear)
    _check_linear(fn, w, 1e-2)


@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_int4_mapping_is_exact(qt: QT) -> None:
    """Emulate the kernel in float32 on the repacked codes: W' (and x') must reproduce x @ W.T.

    Any error here comes only from rounding the scales to bf16 (~2e-3 at most), while a wrong
    offset, plane split or Q6_K group order gives errors of order 1: this pins the repack
    formulas independently of the kernel's bf16 inputs and outputs.
    """
    w = _weight(qt, (N, K), seed=5)
    decode, kind = INT4_TYPES[qt]
    c = decode(w.data, K)
    assert c.codes.dtype == torch.uint8 and int(c.codes.max()) <= 15
    scale = c.scale.to(torch.bfloat16).float().repeat_interleave(int4pack.GROUP, 1)
    zero = c.zero.to(torch.bfloat16).float().repeat_interleave(int4pack.GROUP, 1)
    w_virtual = (c.codes.float() - 8) * scale + zero
    x = torch.randn(7, K).to(torch.bfloat16).float()  # the transform is exact on bf16 inputs
    ref = x @ dequantize(w.data, qt, K).T
    got = int4pack.make_transform(kind)(x).float() @ w_virtual.T
    assert _rel_err(got, ref) < 3e-3


def test_int4_pack_layout_matches_torch() -> None:
    """Our vectorised packer equals torch's converter, including a tail of < 32/64 rows."""
    codes = torch.randint(0, 16, (64 + 48, 96), dtype=torch.uint8)
    out = torch.empty(codes.shape[0], 48, dtype=torch.uint8)
    int4pack.pack_rows(codes, out)
    want = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(out, want.view(out.shape))


@pytest.mark.parametrize("qt", FLOATS, ids=lambda q: q.name)
def test_float_weights(qt: QT) -> None:
    w = _weight(qt, (N, K))
    fn = make_linear(w)
    assert isinstance(fn, DenseLinear)
    _check_linear(fn, w, 1e-5)


@pytest.mark.parametrize("backend", ["native", "int4"])
@pytest.mark.parametrize("qt", [QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.F16], ids=lambda q: q.name)
def test_experts(backend: str, qt: QT) -> None:
    if backend == "native" and not native.available():
        pytest.skip("native kernels not built on this machine")
    w = _weight(qt, (4, 128, K), seed=7)
    fn = make_experts(w, "auto" if qt in FLOATS else backend)  # float weights have one (dense) path
    if qt in FLOATS:
        assert fn is not None
    else:
        assert isinstance(fn, native.NativeExperts if backend == "native" else Int4Experts)
    ref_w = dequantize(w.data, qt, K)
    for e in range(4):
        for m in (1, 7, 64):
            x = torch.randn(m, K)
            assert _rel_err(fn(e, x), x @ ref_w[e].T) <= (BOUND if backend == "native" else 1e-2)


def test_odd_shapes_fall_back() -> None:
    """K not a multiple of 256 (allowed for 32-blocks) cannot use the native kernels: with native
    kernels available such a weight stays on the exact reference path; the int4 backend takes it
    when asked for explicitly."""
    w = _weight(QT.Q8_0, (80, 96))
    assert make_linear(w) is None or not native.available()
    fn = make_linear(w, backend="int4")
    assert isinstance(fn, Int4Linear)
    x = torch.randn(2, 3, 96)  # leading dims are kept
    y = fn(x)
    assert y.shape == (2, 3, 80)
    assert _rel_err(y, x @ dequantize(w.data, QT.Q8_0, 96).T) <= 1e-2


class _TinyDecoder:
    def __init__(self) -> None:
        self.lin = QLinear(_weight(QT.Q4_K, (N, K)), bias=torch.randn(N))
        self.router = QLinear(_weight(QT.F32, (8, K)))
        self.experts = QExperts(_weight(QT.Q6_K, (8, 64, K)))

    def linears(self):
        yield from (self.lin, self.router, self.experts)


def test_prepare_model_sets_fast_and_keeps_bias() -> None:
    dec = _TinyDecoder()
    x = torch.randn(3, K)
    ref_lin, ref_exp = dec.lin(x), dec.experts(5, x)  # reference path (.fast is None)
    fast.prepare_model(dec, progress=False)
    assert all(lin.fast is not None for lin in dec.linears())
    assert _rel_err(dec.lin(x), ref_lin) <= BOUND
    assert _rel_err(dec.experts(5, x), ref_exp) <= BOUND


def test_native_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert isinstance(make_linear(_weight(QT.Q4_K, (64, 256))), Int4Linear)
    finally:
        monkeypatch.delenv("MOESERVE_NATIVE")
        native.library.cache_clear()


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError):
        make_linear(_weight(QT.Q4_K, (64, 256)), "gpu")


@needs_native
def test_whole_model_parity_native(tmp_path) -> None:
    """A Q4_K_M-like synthetic qwen3moe (Q4_K, Q6_K lm_head and expert down, F32 router): the fast
    path's logits match the reference path far inside the issue's 1e-2 * max|logits| bound."""
    from moeserve.gguf.reader import GGUFFile
    from moeserve.model.decoder import load_decoder
    from moeserve.model.layers import SeqSlice
    from moeserve.testing import ModelSpec, write_model

    spec = ModelSpec(
        qtype=QT.Q4_K,
        qtypes={"output.weight": QT.Q6_K, "*ffn_down_exps*": QT.Q6_K, "*ffn_gate_inp*": QT.F32, "*norm*": QT.F32},
    )
    f = GGUFFile(write_model(tmp_path / "m.gguf", spec))
    ids, pos = torch.randint(0, spec.vocab_size, (24,), generator=torch.Generator().manual_seed(0)), torch.arange(24)
    ref = load_decoder(f).forward(ids, pos, [SeqSlice(0, 24)])
    dec = load_decoder(f)
    fast.prepare_model(dec)
    out = dec.forward(ids, pos, [SeqSlice(0, 24)])
    assert _rel_err(out, ref) < 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.98


@needs_native
def test_native_gemm_ragged_rows() -> None:
    """Float32 GEMM: weight rows not a multiple of the tile (24) or micro-kernel (6) height: 250 = 10 * 24 + 10."""
    w = _weight(QT.Q8_0, (250, K), seed=9)
    x = torch.randn(native.GEMM_MIN_ROWS + 1, K)
    ref = x @ dequantize(w.data, QT.Q8_0, K).T
    assert _rel_err(make_linear(w)(x), ref) < 5e-6


@needs_native
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rope_dim", [128, 64])
@pytest.mark.parametrize("with_norm", [True, False])
def test_native_norm_rope_matches_reference(neox: bool, rope_dim: int, with_norm: bool) -> None:
    """`mk_norm_rope` == `rms_norm` + `Rope` (partial RoPE, both layouts, a position past the table)."""
    from moeserve.kernels.rope import Rope
    from moeserve.model.layers import rms_norm

    rope = Rope(rope_dim, 1e6, neox, max_pos=64)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 4, 128, generator=g), torch.randn(128, generator=g)
    pos = torch.tensor([0, 3, 63, 100, 7])
    ref = Rope(rope_dim, 1e6, neox, max_pos=64)(rms_norm(x, w, 1e-6) if with_norm else x, pos)
    got = native.NormRope(rope, 1e-6)(x.clone(), w if with_norm else None, pos)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    from moeserve.model.layers import rms_norm as ref_norm

    torch.testing.assert_close(native.rms_norm(x, w, 1e-6), ref_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("window", [None, 7])
def test_native_decode_attention_matches_reference(window: int | None) -> None:
    """`mk_attn_decode` == torch SDPA for one query per sequence: GQA (32 query / 4 KV heads), a batch of
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


@needs_native
@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_native_dequant_is_bit_exact(qt: QT) -> None:
    """The tiles `mk_gemm` multiplies hold exactly the reference dequantizer's float32 weights."""
    w = _weight(qt, (N, K), seed=4)
    out = torch.empty(N, K)
    assert native.library().mk_dequant(int(qt), w.data.data_ptr(), w.data.shape[-1], N, K, out.data_ptr(), 1) == 0
    assert torch.equal(out, dequantize(w.data, qt, K))


@needs_native
def test_native_argmax_matches_torch() -> None:
    """Same answer as torch.argmax: first index on ties, first NaN when there is one, odd widths."""
    x = torch.randn(5, 1003)
    x[1, 7] = x[1, 900] = 50.0  # tie: the first wins
    x[2, 10], x[2, 20] = float("nan"), float("inf")  # NaN beats everything
    x[3] = float("-inf")
    x[4, 1002] = 99.0  # in the scalar tail
    assert torch.equal(native.argmax(x), torch.argmax(x, dim=-1))


@needs_native
def test_native_attention_propagates_nan_like_torch() -> None:
    """A NaN in a key that is read poisons that KV head's query heads, as in torch; others stay finite."""
    from moeserve.kernels.attention import decode_attention

    q, k, v = torch.randn(1, 8, 64), torch.randn(1, 20, 2, 64), torch.randn(1, 20, 2, 64)
    k[0, 5, 1, 3] = float("nan")
    got = native.attn_decode(q, k, v, torch.tensor([20])).view(1, 8, 64)
    ref = decode_attention(q, k, v, torch.tensor([19]), None).view(1, 8, 64)
    assert torch.equal(got.isnan(), ref.isnan()) and got[0, 4:].isnan().all() and not got[0, :4].isnan().any()


@needs_native
@pytest.mark.parametrize("m", [1, 3, native.GEMM_MIN_ROWS_KQUANT, native.GEMM_MIN_ROWS])
def test_qkv_rope_equals_projections_then_norm_rope(m: int) -> None:
    """`QKVRope` (one `mk_qkv_rope` call at decode; FusedLinears + NormRope from the GEMM threshold on) gives
    bit-identical q, k, v to the separate native projections followed by `NormRope`."""
    from moeserve.kernels.rope import Rope

    nh, nkv, hd = 4, 2, 128
    ws = [_weight(QT.Q4_K, (nh * hd, K), seed=11), _weight(QT.Q4_K, (nkv * hd, K), seed=12),
          _weight(QT.Q6_K, (nkv * hd, K), seed=13)]
    lins = [make_linear(w, "native") for w in ws]
    g = torch.Generator().manual_seed(2)
    qn, kn, x = torch.randn(hd, generator=g), torch.randn(hd, generator=g), torch.randn(m, K, generator=g)
    pos = torch.arange(90, 90 + m)  # past the table: it grows
    fused = native.QKVRope(native.FusedLinears(lins), native.NormRope(Rope(hd, 1e6, True, max_pos=64), 1e-6),
                           qn, kn, nh, nkv, hd)
    q, k, v = fused(x, pos)
    norm_rope = native.NormRope(Rope(hd, 1e6, True, max_pos=64), 1e-6)
    assert torch.equal(q, norm_rope(lins[0](x).view(m, nh, hd), qn, pos))
    assert torch.equal(k, norm_rope(lins[1](x).view(m, nkv, hd), kn, pos))
    assert torch.equal(v, lins[2](x).view(m, nkv, hd))
