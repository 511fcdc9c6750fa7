"""Fast CPU kernels: exact repacks of GGUF blocks into layouts torch's fast kernels consume.

`prepare_model(decoder)` walks `decoder.linears()` and sets `.fast` on every `QLinear`
(`fast(x) -> x @ W.T`) and `QExperts` (`fast(e, x) -> x @ W[e].T`). Both take activations of
any float dtype and shape `[..., K]` (experts: `[m, K]`) and return float32. The engine calls it
for `MOESERVE_KERNELS=fast` (the default); with `reference`, `.fast` stays None and QLinear
dequantizes per call.

Backends, tried in this order for each weight:

1. `native` (native.c via native.py; every quantized type; needs AVX2/FMA/F16C and a C compiler,
   K % 256 == 0): integer dot products straight on the mapped GGUF bytes with 16-bit
   activations for few rows (relative error ~3e-5); then `mk_gemm`: for Q4_K/Q5_K/Q6_K from 4 rows an
   integer GEMM (tiles of weight rows decoded once to int16 code x scale, `pmaddwd` against 15-bit
   activations, relative error ~5e-5), for the other types from 12 rows a tiled GEMM on exact float32
   tiles in each core's L2 (exact up to float32 summation). No repack: zero load time, no extra memory.
2. `int4` (int4pack.py; the torch `_weight_int4pack_mm_for_cpu` kernel, bf16 activations and
   output, relative error up to ~5e-3): an exact repack at load, scales rounded to bf16.

   ============  ==============================================================  ===============
   type          mapping                                                         bytes/weight
   ============  ==============================================================  ===============
   Q4_0/1, Q4_K  one int4 plane, group 32 (q4.py)                                 0.625 (file 0.56)
   Q5_x, Q8_0    two planes in one call, `x' = [x, x]` (q5q8.py)                  1.25
   Q6_K          one 32-group per 16-weight sub-block, `x' = [x, 8x]` (q6k.py)    1.25 (file 0.82)
   ============  ==============================================================  ===============

   The packed layout depends on the CPU's instruction set, so it is built here, at load.
3. F32/F16/BF16: dense `F.linear` (dense.py).

MoE layers additionally get a fused decode path (`moe.py`: gate, up, SiLU, down and the weighted
sum of all of a step's experts in one native call) used for batches of up to `max_tokens` tokens.

`MOESERVE_NATIVE=0` skips the native backend (e.g. to compare with the int4 one). Weights on a
non-CPU device are left on the reference path (`.fast = None`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.fast import native
from moeserve.kernels.fast.dense import DenseExperts, DenseLinear, dense_weight
from moeserve.kernels.fast.int4pack import (
    PLAIN,
    Q6K_PAIRS,
    TWO_PLANES,
    Decoder,
    Int4Experts,
    Int4Linear,
    repack,
)
from moeserve.kernels.fast.q4 import decode_q4_0, decode_q4_1, decode_q4_k
from moeserve.kernels.fast.q5q8 import decode_q5_0, decode_q5_1, decode_q5_k, decode_q8_0
from moeserve.kernels.fast.q6k import decode_q6_k
from moeserve.kernels.qlinear import QExperts, QLinear

__all__ = [
    "BACKENDS",
    "FLOAT_TYPES",
    "INT4_TYPES",
    "make_experts",
    "make_linear",
    "prepare_experts",
    "prepare_linear",
    "prepare_model",
    "prepare_moe",
]

INT4_TYPES: dict[QT, tuple[Decoder, str]] = {
    QT.Q4_0: (decode_q4_0, PLAIN),
    QT.Q4_1: (decode_q4_1, PLAIN),
    QT.Q4_K: (decode_q4_k, PLAIN),
    QT.Q5_0: (decode_q5_0, TWO_PLANES),
    QT.Q5_1: (decode_q5_1, TWO_PLANES),
    QT.Q5_K: (decode_q5_k, TWO_PLANES),
    QT.Q8_0: (decode_q8_0, TWO_PLANES),
    QT.Q6_K: (decode_q6_k, Q6K_PAIRS),
}
"""GGUF type -> (decoder to int4 codes, activation transform)."""

FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})


BACKENDS = ("auto", "native", "int4")


def _backend(w: PackedTensor, backend: str) -> str | None:
    """Which backend serves `w`: 'native', 'int4', 'dense' or None (stay on the reference path)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    qt = QT(w.qtype)
    if w.data.device.type != "cpu":
        return None
    if backend in ("auto", "native") and native.supports(w):
        return "native"
    if backend == "native":
        return None
    if qt in FLOAT_TYPES:
        return "dense"
    if backend == "auto" and native.available():
        # Native kernels exist but not for this shape (K not a multiple of 256: only tiny test
        # models). The exact reference path beats the bf16 int4 fallback's accuracy there.
        return None
    if qt in INT4_TYPES:
        return "int4"
    return None


def _make(w: PackedTensor, backend: str, native_cls: type, dense_cls: type, int4_cls: type) -> Any:
    """The fast kernel object of the backend `_backend` picks for `w` (None: stay on the reference path)."""
    kind = _backend(w, backend)
    if kind == "native":
        return native_cls(w)
    if kind == "dense":
        return dense_cls(dense_weight(w.data, QT(w.qtype), w.shape[-1]))
    if kind == "int4":
        decode, plane = INT4_TYPES[QT(w.qtype)]
        packed, sz = repack(w.data, w.shape[-1], decode, plane)
        return int4_cls(packed, sz, w.shape[-1], plane)
    return None


def make_linear(w: PackedTensor, backend: str = "auto") -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A fast `x -> x @ W.T` for a 2-D packed weight, or None if no fast kernel applies."""
    return _make(w, backend, native.NativeLinear, DenseLinear, Int4Linear)


def make_experts(w: PackedTensor, backend: str = "auto") -> Callable[[int, torch.Tensor], torch.Tensor] | None:
    """A fast `(e, x) -> x @ W[e].T` for a 3-D packed expert stack, or None."""
    return _make(w, backend, native.NativeExperts, DenseExperts, Int4Experts)


def prepare_linear(qlinear: QLinear, backend: str = "auto") -> None:
    """Attach a fast kernel to `qlinear` (leaves `.fast` as is if none applies)."""
    fast = make_linear(qlinear.weight, backend)
    if fast is not None:
        qlinear.fast = fast


def prepare_experts(qexperts: QExperts, backend: str = "auto") -> None:
    """Attach a fast kernel to `qexperts`: all experts are prepared now, nothing per call."""
    fast = make_experts(qexperts.weight, backend)
    if fast is not None:
        qexperts.fast = fast


def prepare_model(decoder: Any, progress: bool = False, backend: str = "auto") -> None:
    """Attach fast kernels to every weight of `decoder.linears()`, in place.

    With `progress`, shows a tqdm bar over the file bytes. The native backend only records
    pointers into the memory map (instant); the int4 backend repacks each weight from the map
    straight into its final buffers in small row chunks, so peak extra memory is the repacked
    model plus a few MB.
    """
    linears = list(decoder.linears())
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(lin.weight.nbytes for lin in linears)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="repacking weights")
    try:
        for lin in linears:
            if isinstance(lin, QExperts):
                prepare_experts(lin, backend)
            else:
                prepare_linear(lin, backend)
            if bar is not None:
                bar.update(lin.weight.nbytes)
    finally:
        if bar is not None:
            bar.close()
    if backend in ("auto", "native"):
        prepare_moe(decoder)
        prepare_attention(decoder)
        embed = getattr(decoder, "embed", None)
        if hasattr(decoder, "embed_rows") and embed is not None and native.supports(embed):
            decoder.embed_rows = native.EmbeddingRows(embed)


def prepare_attention(decoder: Any) -> None:
    """Attach the native one-query attention (`native.attn_decode`), per-head norm + RoPE
    (`native.NormRope`), block RMSNorm (`native.rms_norm`) and the fused q/k/v projection + norm + RoPE
    (`native.QKVRope`) to every CPU layer."""
    if not native.available() or os.environ.get("MOESERVE_NATIVE_ATTENTION", "1") == "0":
        return
    for block in getattr(decoder, "blocks", ()):
        attn = block.attn
        if hasattr(attn, "fast_decode") and attn.rope.cos.device.type == "cpu":
            attn.fast_decode = native.attn_decode
            attn.norm_rope = native.NormRope(attn.rope, attn.eps)
            block.fast_norm = native.rms_norm
            projections = (attn.wq, attn.wk, attn.wv)
            if all(isinstance(p.fast, native.NativeLinear) and p.bias is None for p in projections):
                attn.qkv_rope = native.QKVRope(native.FusedLinears([p.fast for p in projections]), attn.norm_rope,
                                               attn.q_norm, attn.k_norm, attn.n_heads, attn.n_kv_heads,
                                               attn.head_dim)


def prepare_moe(decoder: Any) -> None:
    """Attach the fused native decode MoE (`moe.make_moe`) to every MoE block it supports."""
    from moeserve.kernels.fast.moe import make_moe

    for block in getattr(decoder, "blocks", ()):
        ffn = block.ffn
        if hasattr(ffn, "fused") and all(hasattr(ffn, n) for n in ("gate", "up", "down")):
            ffn.fused = make_moe(ffn.gate, ffn.up, ffn.down)
            if ffn.fused is not None and os.environ.get("MOESERVE_FUSED_ROUTER", "1") != "0":
                ffn.fused.attach_router(ffn.router, ffn.top_k, ffn.renormalize)
