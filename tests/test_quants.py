"""Tests for moeserve.gguf.quants: the torch reference dequantizer must match gguf-py bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from moeserve.errors import UnsupportedQuantError
from moeserve.gguf.quants import (
    SUPPORTED_QTYPES,
    block_info,
    dequantize,
    quantize_np,
    random_quant_bytes,
    row_bytes,
)

ALL = sorted(SUPPORTED_QTYPES, key=lambda t: t.name)
QUANTIZED = [t for t in ALL if t not in (QT.F32, QT.F16, QT.BF16)]

# Expected (weights, bytes) per block, written out from the format spec (REFERENCE.md §3).
EXPECTED_SIZES = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q4_0: (32, 18),
    QT.Q4_1: (32, 20),
    QT.Q5_0: (32, 22),
    QT.Q5_1: (32, 24),
    QT.Q8_0: (32, 34),
    QT.Q2_K: (256, 84),
    QT.Q3_K: (256, 110),
    QT.Q4_K: (256, 144),
    QT.Q5_K: (256, 176),
    QT.Q6_K: (256, 210),
    QT.IQ4_NL: (32, 18),
    QT.IQ4_XS: (256, 136),
}
# Offsets of f16 scale fields inside a block (independent of the module's own table).
F16_OFFSETS = {
    QT.Q4_0: (0,),
    QT.Q4_1: (0, 2),
    QT.Q5_0: (0,),
    QT.Q5_1: (0, 2),
    QT.Q8_0: (0,),
    QT.Q2_K: (80, 82),
    QT.Q3_K: (108,),
    QT.Q4_K: (0, 2),
    QT.Q5_K: (0, 2),
    QT.Q6_K: (208,),
    QT.IQ4_NL: (0,),
    QT.IQ4_XS: (0,),
}


def _n_cols(qtype: QT, n_blocks: int) -> int:
    return block_info(qtype)[0] * n_blocks


def _fully_random_bytes(qtype: QT, lead: tuple[int, ...], n_cols: int, seed: int) -> np.ndarray:
    """Uniformly random bytes, including scale fields, with Inf/NaN exponents made finite.

    Exercises the whole f16 range (negative, subnormal, huge d) rather than only sane values;
    Inf/NaN are excluded because NaN payloads need not survive identically.
    """
    rng = np.random.default_rng(seed)
    nbytes = row_bytes(qtype, n_cols)
    raw = rng.integers(0, 256, size=(*lead, nbytes), dtype=np.uint8)
    if qtype == QT.F32:
        u = raw.view("<u4")
        u[(u & 0x7F800000) == 0x7F800000] &= np.uint32(~0x40000000 & 0xFFFFFFFF)
    elif qtype in (QT.F16, QT.BF16):
        mask = 0x7C00 if qtype == QT.F16 else 0x7F80
        u = raw.view("<u2")
        u[(u & mask) == mask] &= np.uint16(~0x4000 & 0xFFFF)
    else:
        _, type_size = block_info(qtype)
        blocks = raw.reshape(-1, type_size)
        for off in F16_OFFSETS[qtype]:
            u = blocks[:, off : off + 2].copy().view("<u2")
            u[(u & 0x7C00) == 0x7C00] &= np.uint16(~0x4000 & 0xFFFF)
            blocks[:, off : off + 2] = u.view(np.uint8)
    return raw


def _assert_bit_exact(ours: torch.Tensor, ref: np.ndarray) -> None:
    ours_np = ours.cpu().numpy()
    ref = np.asarray(ref, dtype=np.float32)
    assert ours.dtype == torch.float32
    assert ours_np.shape == ref.shape
    assert np.array_equal(ours_np, ref)
    # Also distinguish -0.0 from +0.0: compare the raw bit patterns.
    assert np.array_equal(ours_np.view(np.uint32), ref.view(np.uint32))


def test_block_info_matches_spec() -> None:
    for qtype, sizes in EXPECTED_SIZES.items():
        assert block_info(qtype) == sizes
    assert set(EXPECTED_SIZES) == set(SUPPORTED_QTYPES)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_bit_exact_2d(qtype: QT) -> None:
    # 6 rows, a few hundred blocks in total.
    n_blocks = 64 if block_info(qtype)[0] > 1 else 512
    n_cols = _n_cols(qtype, n_blocks)
    raw = _fully_random_bytes(qtype, (6,), n_cols, seed=1)
    ours = dequantize(torch.from_numpy(raw), qtype, n_cols)
    _assert_bit_exact(ours, gq.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_bit_exact_3d_experts(qtype: QT) -> None:
    n_cols = _n_cols(qtype, 8 if block_info(qtype)[0] > 1 else 256)
    raw = _fully_random_bytes(qtype, (3, 5), n_cols, seed=2)
    ours = dequantize(torch.from_numpy(raw), qtype, n_cols)
    assert ours.shape == (3, 5, n_cols)
    _assert_bit_exact(ours, gq.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_random_quant_bytes_bit_exact(qtype: QT) -> None:
    # Realistic (small-d, subnormal-ish) scales, and a non-contiguous input slice.
    n_cols = _n_cols(qtype, 16 if block_info(qtype)[0] > 1 else 512)
    raw = random_quant_bytes(qtype, (4, 7, n_cols), np.random.default_rng(3))
    t = torch.from_numpy(raw)[:, ::2]
    ours = dequantize(t, qtype, n_cols)
    _assert_bit_exact(ours, gq.dequantize(np.ascontiguousarray(raw[:, ::2]), qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_no_rows(qtype: QT) -> None:
    """Zero rows (an empty embedding lookup) give an empty [0, n] result, not a reshape error."""
    assert dequantize(torch.zeros(0, row_bytes(qtype, 256), dtype=torch.uint8), qtype, 256).shape == (0, 256)


def test_dequantize_1d_row() -> None:
    raw = random_quant_bytes(QT.Q4_K, (512,), np.random.default_rng(4))
    assert raw.shape == (row_bytes(QT.Q4_K, 512),)
    _assert_bit_exact(dequantize(torch.from_numpy(raw), QT.Q4_K, 512), gq.dequantize(raw, QT.Q4_K))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_cuda_matches(qtype: QT) -> None:
    n_cols = _n_cols(qtype, 16 if block_info(qtype)[0] > 1 else 512)
    raw = _fully_random_bytes(qtype, (4,), n_cols, seed=5)
    ours = dequantize(torch.from_numpy(raw).cuda(), qtype, n_cols)
    assert ours.is_cuda
    _assert_bit_exact(ours, gq.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_random_quant_bytes_magnitude(qtype: QT, scale: float) -> None:
    n_cols = _n_cols(qtype, 32 if block_info(qtype)[0] > 1 else 4096)
    shape = (2, 8, n_cols)
    raw = random_quant_bytes(qtype, shape, np.random.default_rng(6), scale=scale)
    assert raw.dtype == np.uint8
    assert raw.shape == (2, 8, row_bytes(qtype, n_cols))
    w = dequantize(torch.from_numpy(raw), qtype, n_cols)
    assert torch.isfinite(w).all()
    rms = w.square().mean().sqrt().item()
    assert 0.8 * scale < rms < 1.25 * scale, (qtype.name, rms)
    assert abs(w.mean().item()) < 0.1 * scale
    assert w.abs().max().item() < 12 * scale


def test_random_quant_bytes_deterministic_and_varied() -> None:
    a = random_quant_bytes(QT.Q6_K, (3, 256), np.random.default_rng(7))
    b = random_quant_bytes(QT.Q6_K, (3, 256), np.random.default_rng(7))
    c = random_quant_bytes(QT.Q6_K, (3, 256), np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16], ids=lambda t: t.name)
def test_random_quant_bytes_float_rounding(qtype: QT) -> None:
    # Same seed -> same normal draws; the 16-bit bytes must be those values rounded as gguf does.
    f32 = random_quant_bytes(QT.F32, (4, 300), np.random.default_rng(11), scale=3.0)
    half = random_quant_bytes(qtype, (4, 300), np.random.default_rng(11), scale=3.0)
    values = dequantize(torch.from_numpy(f32), QT.F32, 300).numpy()
    assert np.array_equal(half, quantize_np(values, qtype))


def test_random_quant_bytes_rejects_bad_args() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        random_quant_bytes(QT.Q4_0, (4, 33), rng)
    with pytest.raises(ValueError):
        random_quant_bytes(QT.Q4_0, (4, 32), rng, scale=0.0)
    with pytest.raises(UnsupportedQuantError):
        random_quant_bytes(QT.IQ3_S, (4, 256), rng)


def test_row_bytes() -> None:
    assert row_bytes(QT.Q4_K, 2048) == 8 * 144
    assert row_bytes(QT.Q8_0, 64) == 68
    assert row_bytes(QT.F32, 3) == 12
    with pytest.raises(ValueError, match="block"):
        row_bytes(QT.Q4_K, 100)
    with pytest.raises(ValueError):
        row_bytes(QT.Q4_0, 48)
    with pytest.raises(ValueError):
        row_bytes(QT.Q4_0, -32)


def test_unsupported_qtype() -> None:
    with pytest.raises(UnsupportedQuantError, match="IQ3_S"):
        block_info(QT.IQ3_S)
    with pytest.raises(UnsupportedQuantError):
        dequantize(torch.zeros(110, dtype=torch.uint8), QT.IQ3_S, 256)
    with pytest.raises(ValueError):  # UnsupportedQuantError is a ValueError
        row_bytes(QT.IQ2_XXS, 256)


def test_dequantize_rejects_bad_input() -> None:
    with pytest.raises(ValueError):  # wrong byte count for n_cols
        dequantize(torch.zeros(2, 100, dtype=torch.uint8), QT.Q4_K, 256)
    with pytest.raises(ValueError):  # not bytes
        dequantize(torch.zeros(2, 144, dtype=torch.float32), QT.Q4_K, 256)


def test_quantize_np_q8_0_round_trip() -> None:
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((3, 4, 512)) * 0.02).astype(np.float32)
    packed = quantize_np(x, QT.Q8_0)
    assert packed.dtype == np.uint8 and packed.shape == (3, 4, row_bytes(QT.Q8_0, 512))
    y = dequantize(torch.from_numpy(packed), QT.Q8_0, 512).numpy()
    # Error per weight is at most half a step (absmax/127/2) plus the f16 rounding of d.
    step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    err = np.abs((y - x).reshape(-1, 32))
    assert (err <= 0.51 * step + 1e-3 * np.abs(x.reshape(-1, 32))).all()


@pytest.mark.parametrize(
    "qtype", [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0], ids=lambda t: t.name
)
def test_quantize_np_matches_gguf(qtype: QT) -> None:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    packed = quantize_np(x, qtype)
    assert packed.dtype == np.uint8 and packed.shape == (5, row_bytes(qtype, 256))
    ref = np.ascontiguousarray(gq.quantize(x, qtype)).view(np.uint8).reshape(5, -1)
    assert np.array_equal(packed, ref)
    y = dequantize(torch.from_numpy(packed), qtype, 256).numpy()
    if qtype == QT.F32:
        assert np.array_equal(y, x)
    else:
        assert np.abs(y - x).max() < 0.5  # coarse sanity: decodes to the same values


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS], ids=lambda t: t.name)
def test_quantize_np_rejects_k_quants(qtype: QT) -> None:
    with pytest.raises(ValueError, match="random_quant_bytes"):
        quantize_np(np.zeros((2, 256), dtype=np.float32), qtype)


def test_quantize_np_bad_cols() -> None:
    with pytest.raises(ValueError):
        quantize_np(np.zeros((2, 40), dtype=np.float32), QT.Q8_0)
