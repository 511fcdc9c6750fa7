"""Fused native MoE for decode-sized batches: one operator call per layer.

`make_moe(gate, up, down)` returns `fused(x [T, H], weights [T, k], experts [T, k]) -> out [T, H]`
(float32), computing for every token `Sum_j w_j * down_e(silu(gate_e(x)) * up_e(x))` with
`torch.ops.moeserve.moe` (`mk_moe` in csrc/moe.c): the same integer dot products as the native
few-row matmul, on the GGUF bytes in place, with the token's activation quantized once for all of its
experts, each expert's rows read once for all the tokens routed to it, and both cores busy in one
OpenMP region (gate/up rows of all experts, one barrier, then down rows) — instead of k x 3 matmul
calls, sort/bincount/index_add and their fork/joins from Python.

With a float32 router attached (the Q4_K_M layout), `routed(x)` also does the routing in the
same call (`moe_routed`): router logits split over the threads, softmax / top-k / renormalisation
in C (same expert ids and order as `kernels.moe.route`, weights within float32 rounding).

Where the grouped path wins: the fused kernel does integer dot products per (row, token) (each
row read once from memory for all tokens routed to its expert, then from L1), the grouped path
switches an expert with >= 8 tokens to dequant + float32 GEMM. On Qwen3-30B-A3B layer shapes
(2 cores, uniform random routing) fused was faster at every T measured: per layer T=1 1.7 vs
2.8 ms, T=8 12.6 vs 18.3, T=64 81 vs 113, T=128 212 vs 315. Real routers are skewed (hot experts
get many tokens, where the GEMM wins), so the default threshold is 32 tokens: every decode step of
up to 32 running sequences (the engine's default `max_num_seqs`); long prefill chunks stay grouped.
`NativeMoE` (kernels/cpu/backend.py) takes the fused path for `T <= fused.max_tokens`.

`MOESERVE_FUSED_MOE=0` disables it, `MOESERVE_FUSED_MOE_MAX_TOKENS` overrides the threshold.

A `FusedMoE` keeps no per-call state: several threads may call the same object at once.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.cpu import native


class QExperts(Protocol):
    """What the fused MoE reads from an expert stack: any object with the stack's `PackedTensor` as `weight`
    (`NativeExperts`, the reference experts, ...)."""

    weight: PackedTensor  # [E, out, in]


class RouterLike(Protocol):
    """What `attach_router` reads from a router linear: `weight` (a `PackedTensor` [E, H]) and, if it has one,
    `bias`."""

    weight: PackedTensor

MAX_TOKENS = 32
"""Default largest T for the fused path (see the module docstring)."""


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()


class FusedMoE:
    """`(x [T, H], weights [T, k], experts [T, k] int64) -> out [T, H]` float32, via `moeserve::moe`.

    With a float32 router attached (`attach_router`), `routed(x)` also does the routing (router
    logits, softmax, top-k, renormalisation) inside the same native call (`moeserve::moe_routed`).
    """

    def __init__(self, gate: QExperts, up: QExperts, down: QExperts, max_tokens: int = MAX_TOKENS) -> None:
        ops = native.ops()
        self._moe, self._moe_routed = ops.moe.default, ops.moe_routed.default
        self.n_experts, self.intermediate, self.hidden = gate.weight.shape
        self.max_tokens = max_tokens
        self.top_k = 0  # > 0 once a router is attached
        self.renormalize = True
        self._gate, self._up, self._down = gate.weight.data, up.weight.data, down.weight.data
        self._qtypes = [int(gate.weight.qtype), int(up.weight.qtype), int(down.weight.qtype)]
        self._router: torch.Tensor | None = None

    def attach_router(self, router: RouterLike, top_k: int, renormalize: bool) -> bool:
        """Route natively with `router` if it is a plain float32 `[E, H]` matrix without bias."""
        w = getattr(router, "weight", None)
        if (not isinstance(w, PackedTensor) or QT(w.qtype) != QT.F32 or getattr(router, "bias", None) is not None
                or tuple(w.shape) != (self.n_experts, self.hidden)
                or w.data.device.type != "cpu" or not w.data.is_contiguous() or not 0 < top_k <= self.n_experts):
            return False
        data = w.data
        if data.dtype is not torch.float32:
            if data.dtype is not torch.uint8 or data.storage_offset() % 4:
                return False
            data = data.view(torch.float32)  # the raw bytes [E, 4 H] in the map, read as [E, H]
        if tuple(data.shape) != (self.n_experts, self.hidden):
            return False
        self._router, self.renormalize, self.top_k = data, bool(renormalize), top_k
        return True

    def routed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out [T, H], weights [T, k], experts [T, k]) with the routing done natively."""
        top_k, router = self.top_k, self._router
        if not top_k or router is None:
            raise RuntimeError("no router attached")
        return self._moe_routed(_f32(x), self._gate, self._up, self._down, self._qtypes, router, top_k,
                                self.renormalize)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if experts.dtype is not torch.int64 or not experts.is_contiguous():
            experts = experts.long().contiguous()
        return self._moe(_f32(x), _f32(weights), experts, self._gate, self._up, self._down, self._qtypes)


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


supports_moe = supports


def make_moe(gate: QExperts, up: QExperts, down: QExperts) -> FusedMoE | None:
    """The fused decode MoE for these expert stacks, or None when it does not apply."""
    if os.environ.get("MOESERVE_FUSED_MOE", "1") == "0" or not supports(gate, up, down):
        return None
    max_tokens = int(os.environ.get("MOESERVE_FUSED_MOE_MAX_TOKENS", MAX_TOKENS))
    return FusedMoE(gate, up, down, max_tokens) if max_tokens > 0 else None
