"""Fused native MoE for decode-sized batches: one C call per layer per step.

`make_moe(gate, up, down)` returns `fused(x [T, H], weights [T, k], experts [T, k]) -> out [T, H]`
(float32), computing for every token `Sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))` with
`mk_moe` in native.c: the same integer dot products as the native few-row matmul, on the GGUF
bytes in place, with the token's activation quantized once for all of its experts, each
expert's rows read once for all the tokens routed to it, and both cores busy in one OpenMP
region (gate/up rows of all experts, one barrier, then down rows) — instead of k x 3 matmul calls,
sort/bincount/index_add and their fork/joins from Python.

With a float32 router attached (the Q4_K_M layout), `routed(x)` also does the routing in the
same call: router logits split over the threads, softmax / top-k / renormalisation in C (same
expert ids and order as `kernels.moe.route`, weights within float32 rounding).

Where the grouped path wins: the fused kernel does integer dot products per (row, token) (each
row read once from memory for all tokens routed to its expert, then from L1), the grouped path
switches an expert with >= 8 tokens to dequant + float32 GEMM. On Qwen3-30B-A3B layer shapes
(2 cores, uniform random routing) fused was faster at every T measured: per layer T=1 1.7 vs
2.8 ms, T=8 12.6 vs 18.3, T=64 81 vs 113, T=128 212 vs 315. Real routers are skewed (hot experts
get many tokens, where the GEMM wins), so the default threshold is 32 tokens: every decode step of
up to 32 running sequences (the engine's default `max_num_seqs`); long prefill chunks stay grouped.
`MoE` takes the fused path for `T <= fused.max_tokens`.

`MOESERVE_FUSED_MOE=0` disables it, `MOESERVE_FUSED_MOE_MAX_TOKENS` overrides the threshold,
`MOESERVE_FUSED_ROUTER=0` keeps the routing in torch.
"""

from __future__ import annotations

import ctypes
import os

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.kernels.fast import native
from moeserve.kernels.qlinear import QExperts, QLinear

MAX_TOKENS = 32
"""Default largest T for the fused path (see the module docstring)."""


class FusedMoE:
    """`(x [T, H], weights [T, k], experts [T, k] int64) -> out [T, H]` float32, via `mk_moe`.

    With a float32 router attached (`attach_router`), `routed(x)` also does the routing (router
    logits, softmax, top-k, renormalisation) inside the same native call (`mk_moe_routed`).
    """

    def __init__(self, gate: QExperts, up: QExperts, down: QExperts, max_tokens: int = MAX_TOKENS) -> None:
        lib = native.library()
        assert lib is not None
        self.n_experts, self.intermediate, self.hidden = gate.n_experts, gate.out_features, gate.in_features
        self.max_tokens = max_tokens
        self.top_k = 0  # > 0 once a router is attached
        stacks = (gate.weight, up.weight, down.weight)
        self._keep: tuple = stacks  # the mapped bytes must outlive the raw pointers below
        layer = native.MoeLayer()
        for i, w in enumerate(stacks):
            layer.qtype[i] = int(w.qtype)
            layer.base[i] = w.data.data_ptr()
            layer.expert_stride[i] = w.data.stride(0)
            layer.row_bytes[i] = w.data.stride(1)
        layer.n_experts, layer.H, layer.I = self.n_experts, self.hidden, self.intermediate
        self._layer = layer
        self._ptr = ctypes.pointer(layer)
        self._fn, self._routed = lib.mk_moe, lib.mk_moe_routed

    def attach_router(self, router: QLinear, top_k: int, renormalize: bool) -> bool:
        """Route natively with `router` if it is a plain float32 `[E, H]` matrix without bias."""
        w = router.weight
        if (QT(w.qtype) != QT.F32 or router.bias is not None or tuple(w.shape) != (self.n_experts, self.hidden)
                or w.data.device.type != "cpu" or not w.data.is_contiguous() or not 0 < top_k <= self.n_experts):
            return False
        self._router = w.data  # raw float32 bytes [E, 4 H] in the map: kept alive by this reference
        self._layer.router = w.data.data_ptr()
        self._layer.renormalize = int(renormalize)
        self.top_k = top_k
        return True

    def routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out [T, H], weights [T, k], experts [T, k]) with the routing done natively."""
        if not self.top_k:
            raise RuntimeError("no router attached")
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        T, k = x.shape[0], self.top_k
        out, weights, experts = torch.empty(T, self.hidden), torch.empty(T, k), torch.empty(T, k, dtype=torch.int64)
        if self._routed(self._ptr, T, k, x.data_ptr(), weights.data_ptr(), experts.data_ptr(), out.data_ptr(),
                        torch.get_num_threads()):
            raise RuntimeError("mk_moe_routed rejected its inputs")
        return out, weights, experts

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        T, k = experts.shape
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        if weights.dtype is not torch.float32 or not weights.is_contiguous():
            weights = weights.float().contiguous()
        if experts.dtype is not torch.int64 or not experts.is_contiguous():
            experts = experts.long().contiguous()
        out = torch.empty(T, self.hidden)
        rc = self._fn(self._ptr, T, k, x.data_ptr(), weights.data_ptr(), experts.data_ptr(), out.data_ptr(),
                      torch.get_num_threads())
        if rc:
            raise RuntimeError("mk_moe: expert id out of range" if rc == -2 else "mk_moe rejected its inputs")
        return out


def supports(gate: QExperts, up: QExperts, down: QExperts) -> bool:
    """True if the three stacks have native types, consistent SwiGLU shapes and a plain layout."""
    E, I, H = gate.weight.shape
    if tuple(up.weight.shape) != (E, I, H) or tuple(down.weight.shape) != (E, H, I):
        return False
    for w in (gate.weight, up.weight, down.weight):
        if QT(w.qtype) not in native.NATIVE_TYPES or not native.supports(w):
            return False
        if w.data.dim() != 3 or w.data.stride(2) != 1 or w.data.stride(1) != w.data.shape[2]:
            return False
    return True


def make_moe(gate: QExperts, up: QExperts, down: QExperts) -> FusedMoE | None:
    """The fused decode MoE for these expert stacks, or None when it does not apply."""
    if os.environ.get("MOESERVE_FUSED_MOE", "1") == "0" or not supports(gate, up, down):
        return None
    max_tokens = int(os.environ.get("MOESERVE_FUSED_MOE_MAX_TOKENS", MAX_TOKENS))
    return FusedMoE(gate, up, down, max_tokens) if max_tokens > 0 else None
