"""Build and call the native GGUF kernels in `native.c` (AVX2 + FMA + F16C CPUs).

Why a C file: on AVX2-only machines torch's int4 kernel is instruction-bound at decode
(~0.35 cycles per weight) and rounds activations and outputs to bf16. `native.c` runs integer
dot products straight on the file's GGUF blocks with 16-bit activations: no repack (zero load
time, zero extra memory), float32 output, ~1e-5 relative error. For larger batches (`mk_gemm`)
each thread decodes tiles of weight rows once in its cache and multiplies them with all the rows:
for the K-quants as int16 code x scale against 15-bit activations (`pmaddwd`, ~5e-5), for the
other types as exact float32 with an FMA micro-kernel.

The library is compiled on first use with the system C compiler into a per-machine cache
(`$MOESERVE_CACHE`, default `~/.cache/moeserve`), keyed by a hash of the source and flags; if
there is no compiler or the CPU lacks AVX2/FMA/F16C, `available()` is False and callers fall back
to the torch int4 path. `MOESERVE_NATIVE=0` disables it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor

NATIVE_TYPES = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K})
_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
_ABI = 11

GEMM_MIN_ROWS = 12
"""From this many activation rows on, `mk_gemm` replaces the few-row integer kernel, whose cost grows with
every row (it decodes each block once per group of up to 4 rows). For Q4_0..Q8_0 `mk_gemm` dequantizes a
tile of weight rows to exact float32 in L2 and runs a float32 FMA micro-kernel; measured on the 2-core
AVX2 machine, 2 threads, integer vs tiled: Q4_K 768x2048 m=8 0.28 vs 0.29 ms, m=12 0.39 vs 0.38, m=16
0.51 vs 0.40 (the K-quants have their own threshold below)."""

GEMM_MIN_ROWS_KQUANT = 4
"""The same for Q4_K/Q5_K/Q6_K, whose `mk_gemm` is the integer GEMM (a tile decoded once to int16
q * scale, pmaddwd against 15-bit activations). Integer dots vs integer GEMM, 2 threads: Q4_K 768x2048
m=2 0.079 vs 0.120 ms, m=4 0.130 vs 0.123, m=8 0.27 vs 0.18, m=16 0.55 vs 0.31; Q6_K lm_head
151936x2048 m=4 29 vs 28 ms, m=8 60 vs 37, m=16 114 vs 61 (the float32 GEMM: 72 at m=16)."""

KQUANTS = frozenset({QT.Q4_K, QT.Q5_K, QT.Q6_K})


def _cpu_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


def _cache_dir() -> Path:
    return Path(os.environ.get("MOESERVE_CACHE", Path.home() / ".cache" / "moeserve"))


def _compile(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", str(tmp_so)], check=True, capture_output=True)
        os.replace(tmp_so, out)  # atomic: concurrent loaders never see a half-written library


class MatSpec(ctypes.Structure):
    """`mk_mat_t`: one weight matrix (GGUF bytes in place) and its output buffer, for `mk_matmul_multi`."""

    _fields_ = [("qtype", ctypes.c_int32), ("pad", ctypes.c_int32), ("w", ctypes.c_void_p),
                ("row_bytes", ctypes.c_int64), ("N", ctypes.c_int64), ("y", ctypes.c_void_p)]


class MoeLayer(ctypes.Structure):
    """`mk_moe_t`: the gate, up and down expert stacks of one MoE layer, as GGUF bytes in place."""

    _fields_ = [
        ("qtype", ctypes.c_int32 * 3),
        ("pad", ctypes.c_int32),
        ("base", ctypes.c_void_p * 3),
        ("expert_stride", ctypes.c_int64 * 3),
        ("row_bytes", ctypes.c_int64 * 3),
        ("n_experts", ctypes.c_int64),
        ("H", ctypes.c_int64),
        ("I", ctypes.c_int64),
        ("router", ctypes.c_void_p),
        ("renormalize", ctypes.c_int64),
    ]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when it cannot be used on this machine."""
    if os.environ.get("MOESERVE_NATIVE", "1") == "0" or not _cpu_ok() or not _SOURCE.is_file():
        return None  # (the source ships as package data: `kernels/fast/*.c`)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"moeserve_native_{key}.so"
    try:
        if not path.exists():
            _compile(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.CalledProcessError):
        return None
    if lib.mk_abi_version() != _ABI:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mk_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.mk_matmul.restype = ctypes.c_int
    lib.mk_matmul_multi.argtypes = [ctypes.POINTER(MatSpec), i64, i64, ptr, i64, ctypes.c_int]
    lib.mk_matmul_multi.restype = ctypes.c_int
    for fn in (lib.mk_gemm, lib.mk_gemm_f32, lib.mk_gemm_i16):
        fn.argtypes = lib.mk_matmul.argtypes
        fn.restype = ctypes.c_int
    lib.mk_attn_decode.argtypes = [ptr, ptr, ptr, i64, i64, ptr, i64, i64, i64, ctypes.c_float, i64, ptr, i64, i64,
                                   i64, ptr, ctypes.c_int]
    lib.mk_attn_decode.restype = ctypes.c_int
    lib.mk_norm_rope.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_float, i64, ctypes.c_int, ptr, ptr, ptr]
    lib.mk_norm_rope.restype = ctypes.c_int
    lib.mk_rms_norm.argtypes = [ptr, ptr, i64, i64, ptr, ctypes.c_float]
    lib.mk_rms_norm.restype = ctypes.c_int
    lib.mk_dequant.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
    lib.mk_dequant.restype = ctypes.c_int
    lib.mk_qkv_rope.argtypes = [ctypes.POINTER(MatSpec), i64, ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_float, i64,
                                ctypes.c_int, ptr, ptr, ptr, ctypes.c_int]
    lib.mk_qkv_rope.restype = ctypes.c_int
    lib.mk_argmax.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.mk_argmax.restype = ctypes.c_int
    lib.mk_moe.argtypes = [ctypes.POINTER(MoeLayer), i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.mk_moe.restype = ctypes.c_int
    lib.mk_moe_routed.argtypes = lib.mk_moe.argtypes
    lib.mk_moe_routed.restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


def supports(w: PackedTensor) -> bool:
    """True if `w` can use the native kernels (type, layout, CPU, K a multiple of 256)."""
    return (
        QT(w.qtype) in NATIVE_TYPES
        and w.data.device.type == "cpu"
        and w.shape[-1] % 256 == 0
        and w.data.is_contiguous()
        and available()
    )


class NativeMatmul:
    """Shared call logic: small m -> integer kernel on the GGUF bytes; larger m -> tiled `mk_gemm`."""

    def __init__(self, w: PackedTensor) -> None:
        lib = library()
        assert lib is not None
        self.weight = w
        self.qtype = int(w.qtype)
        self.out_features, self.in_features = w.shape[-2], w.shape[-1]
        self.row_bytes = w.data.shape[-1]
        self._mm, self._gemm = lib.mk_matmul, lib.mk_gemm
        self.gemm_min_rows = GEMM_MIN_ROWS_KQUANT if QT(w.qtype) in KQUANTS else GEMM_MIN_ROWS

    @property
    def nbytes(self) -> int:
        return 0  # runs on the mapped file bytes: nothing extra is allocated

    def _run(self, ptr: int, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            x = x.reshape(-1, self.in_features)
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        m, n, k = x.shape[0], self.out_features, self.in_features
        threads = torch.get_num_threads()
        y = torch.empty(m, n)
        fn = self._gemm if m >= self.gemm_min_rows else self._mm
        if fn(self.qtype, ptr, self.row_bytes, n, k, x.data_ptr(), m, y.data_ptr(), threads):
            raise RuntimeError(f"native kernel rejected {self.weight.name}")
        return y


class NativeLinear(NativeMatmul):
    """`fast(x) -> x @ W.T` (float32) on a 2-D GGUF weight."""

    def __init__(self, w: PackedTensor) -> None:
        super().__init__(w)
        self._ptr = w.data.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self._run(self._ptr, x).view(*lead, self.out_features)


class FusedLinears:
    """`fused(x) -> (x @ W_1.T, x @ W_2.T, ...)` for native linears sharing their input (an attention
    layer's q, k, v projections). Below `gemm_min_rows` (the smallest of the linears' GEMM thresholds) it
    is one `mk_matmul_multi` call: the input is quantized once and one parallel region covers every row,
    instead of three calls each paying ~15-20 us of call, quantization and fork/join at decode. Larger
    inputs take each linear's own path, so the outputs are always those of the separate calls."""

    def __init__(self, linears: list[NativeLinear]) -> None:
        lib = library()
        assert lib is not None and linears and len(linears) <= 8
        if len({lin.in_features for lin in linears}) != 1:
            raise ValueError("fused linears must share their input size")
        self.linears = linears
        self.in_features = linears[0].in_features
        self.gemm_min_rows = min(lin.gemm_min_rows for lin in linears)
        self._specs = (MatSpec * len(linears))()
        for spec, lin in zip(self._specs, linears, strict=True):
            spec.qtype, spec.w, spec.row_bytes, spec.N = lin.qtype, lin._ptr, lin.row_bytes, lin.out_features
        self._fn = lib.mk_matmul_multi

    def bind_outputs(self, m: int) -> tuple[torch.Tensor, ...]:
        """Fresh outputs [m, N_j], their pointers written into the matrix specs for the next native call."""
        outs = tuple(torch.empty(m, lin.out_features) for lin in self.linears)
        for spec, y in zip(self._specs, outs, strict=True):
            spec.y = y.data_ptr()
        return outs

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dim() != 2 or x.shape[0] >= self.gemm_min_rows:
            return tuple(lin(x) for lin in self.linears)
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        m = x.shape[0]
        outs = self.bind_outputs(m)
        if self._fn(self._specs, len(self.linears), self.in_features, x.data_ptr(), m, torch.get_num_threads()):
            raise RuntimeError("mk_matmul_multi rejected its inputs")
        return outs


class QKVRope:
    """`(h [T, H], positions [T]) -> (q [T, nh, hd], k [T, nkv, hd], v [T, nkv, hd])`: an attention layer's
    projections, per-head q/k RMSNorm and RoPE. At decode (< `fused.gemm_min_rows` rows) one native call
    (`mk_qkv_rope`) does all of it; larger inputs take `FusedLinears` (tiled GEMMs) and `NormRope`."""

    def __init__(self, fused: FusedLinears, norm_rope: NormRope, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
        self.fused, self.norm_rope, self.q_norm, self.k_norm = fused, norm_rope, q_norm, k_norm
        self.nh, self.nkv, self.hd = n_heads, n_kv_heads, head_dim
        lib = library()
        assert lib is not None
        self._fn = lib.mk_qkv_rope

    def __call__(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = h.shape[0]
        native_ok = (h.dim() == 2 and 0 < T < self.fused.gemm_min_rows and h.shape[1] == self.fused.in_features
                     and _plain(h) and positions.dtype is torch.int64
                     and positions.is_contiguous() and all(w is None or _plain(w) for w in (self.q_norm, self.k_norm)))
        if not native_ok:
            q, k, v = self.fused(h)
            q, k = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd)
            return self.norm_rope(q, self.q_norm, positions), self.norm_rope(k, self.k_norm, positions), \
                v.view(T, self.nkv, self.hd)
        rope = self.norm_rope.rope
        rope.ensure(int(positions.max()))
        q, k, v = self.fused.bind_outputs(T)
        ptr = lambda w: w.data_ptr() if w is not None else None  # noqa: E731
        if self._fn(self.fused._specs, self.fused.in_features, h.data_ptr(), T, self.nh, self.nkv, self.hd,
                    ptr(self.q_norm), ptr(self.k_norm), self.norm_rope.eps, rope.rope_dim, int(rope.neox),
                    rope.cos.data_ptr(), rope.sin.data_ptr(), positions.data_ptr(), torch.get_num_threads()):
            raise RuntimeError("mk_qkv_rope rejected its inputs")
        return q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd), v.view(T, self.nkv, self.hd)


class NativeExperts(NativeMatmul):
    """`fast(e, x) -> x @ W[e].T` (float32) on a 3-D expert stack; expert e is a pointer offset."""

    def __init__(self, w: PackedTensor) -> None:
        super().__init__(w)
        base, stride = w.data.data_ptr(), w.data.stride(0)
        self._ptrs = [base + e * stride for e in range(w.shape[0])]

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._run(self._ptrs[e], x)


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, window: int | None = None,
                scale: float | None = None, table: torch.Tensor | None = None,
                block_size: int = 0) -> torch.Tensor | None:
    """One query per sequence (`mk_attn_decode`): q [B, nh, hd], lens [B] int64 -> [B, nh*hd]; the same
    result as `decode_attention` / `gqa_attention` for one query. k/v are either padded per sequence,
    [B, L, nkv, hd] (rows past `lens[b]` are ignored), or, with `table` [B, nb] int64 block ids and
    `block_size`, the paged pool's slots [n_blocks * block_size, nkv, hd], read in place (row j of
    sequence b is slot table[b, j // block_size] * block_size + j % block_size).
    None when the inputs do not fit the kernel (the caller falls back)."""
    lib = library()
    B, nh, hd = q.shape
    paged = table is not None
    if (lib is None or q.device.type != "cpu" or k.dtype is not torch.float32 or v.dtype is not torch.float32
            or q.dtype is not torch.float32 or hd % 8 or hd > 256 or k.dim() != (3 if paged else 4)
            or (k.shape[0] != B and not paged) or k.shape != v.shape or k.shape[-1] != hd or nh % k.shape[-2]
            or lens.numel() != B):
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lens = lens.to(torch.int64).contiguous()
    if paged:
        if block_size < 1 or table.dim() != 2 or table.shape[0] != B:
            return None
        table = table.to(torch.int64).contiguous()
        lmax, nkv, tptr, tstride = table.shape[1] * block_size, k.shape[1], table.data_ptr(), table.shape[1]
    else:
        lmax, nkv, tptr, tstride, block_size = k.shape[1], k.shape[2], None, 0, 0
    nslots = k.shape[0]  # (paged: pool rows; the kernel checks every block it reads lies inside)
    out = torch.empty(B, nh * hd)
    rc = lib.mk_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, lmax, lens.data_ptr(), nh, nkv, hd,
                            scale if scale is not None else hd ** -0.5, window or 0, tptr, tstride, block_size,
                            nslots, out.data_ptr(), torch.get_num_threads())
    return None if rc else out


class EmbeddingRows:
    """`rows(ids) -> [len(ids), K]` float32: an embedding lookup dequantizing only the rows asked for
    with `mk_dequant` (bit-exact with the reference dequantizer, ~1 us per row instead of ~0.3 ms
    per call through the numpy reference)."""

    def __init__(self, w: PackedTensor) -> None:
        lib = library()
        assert lib is not None
        self.weight, self.qtype, self.K = w, int(w.qtype), w.shape[-1]
        self._fn = lib.mk_dequant

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        raw = self.weight.data[ids.reshape(-1)].contiguous()  # the rows' GGUF bytes (bad ids: an index error)
        n = raw.shape[0]
        out = torch.empty(n, self.K)
        if n and self._fn(self.qtype, raw.data_ptr(), raw.shape[-1], n, self.K, out.data_ptr(), 1):
            raise RuntimeError(f"mk_dequant rejected {self.weight.name}")
        return out.view(*ids.shape, self.K)


def argmax(x: torch.Tensor) -> torch.Tensor | None:
    """`torch.argmax(x, dim=-1)` for a float32 CPU matrix [R, V] (same ties and NaN rule), or None
    when it does not apply."""
    lib = library()
    if lib is None or x.dim() != 2 or not _plain(x) or x.shape[1] < 1:
        return None
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.mk_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def _plain(t: torch.Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_contiguous() and t.device.type == "cpu"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`model.layers.rms_norm` over the last dim in one native call (new tensor), or None if it does not apply."""
    lib = library()
    if lib is None or not (_plain(x) and _plain(weight)) or x.shape[-1] != weight.shape[0]:
        return None
    out = torch.empty_like(x)
    lib.mk_rms_norm(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], weight.data_ptr(), eps)
    return out


class NormRope:
    """`(x [T, nh, hd], norm_weight | None, positions [T]) -> x`, in place: per-head RMSNorm then RoPE
    in one native call (`mk_norm_rope`); the same math as `rms_norm` + `Rope.__call__`."""

    def __init__(self, rope: Any, eps: float) -> None:
        lib = library()
        assert lib is not None
        self.rope, self.eps, self._fn = rope, eps, lib.mk_norm_rope

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rope
        if not _plain(x) or (weight is not None and not _plain(weight)) or x.dim() != 3:
            if weight is not None:  # the reference formula (model.layers.rms_norm)
                xf = x.float()
                x = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight
            return rope(x, positions)
        if positions.dtype is not torch.int64 or not positions.is_contiguous():
            positions = positions.long().contiguous()
        rope.ensure(int(positions.max()))
        T, nh, hd = x.shape
        rc = self._fn(x.data_ptr(), T, nh, hd, weight.data_ptr() if weight is not None else None, self.eps,
                      rope.rope_dim, int(rope.neox), rope.cos.data_ptr(), rope.sin.data_ptr(), positions.data_ptr())
        if rc:
            raise RuntimeError("mk_norm_rope rejected its inputs")
        return x
