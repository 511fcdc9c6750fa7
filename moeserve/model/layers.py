"""The layers every supported decoder is built from: attention, dense MLP, MoE, the pre-norm block.

Each layer holds one kernel object per operation, asked of the backend once at load
(`kernels/backend.py`), and its forward reads like the paper. Layers work on a flattened batch of T
tokens that may belong to several sequences; only the attention kernel needs to know where one
sequence ends, and it learns that from the step's `AttentionMetadata`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.backend import Attention as AttentionKernel
from moeserve.kernels.backend import Linear, MoEBlock, Norm, QKVProjection
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.profiler import stage


class Attention:
    """o_proj(attention(rope(norm(q)), rope(norm(k)), v)) over the paged KV cache."""

    def __init__(self, qkv: QKVProjection, attn: AttentionKernel, o_proj: Linear) -> None:
        self.qkv, self.attn, self.o_proj = qkv, attn, o_proj

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv(h, meta)
        return self.o_proj(self.attn(q, k, v, meta))


class MLP:
    """Dense SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, gate: Linear, up: Linear, down: Linear) -> None:
        self.gate, self.up, self.down = gate, up, down

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(h)) * self.up(h))


class Block:
    """Pre-norm transformer block: x += attn(norm(x)); x += ffn(norm(x)).

    The FFN is a dense `MLP` or the backend's MoE block — top-k routed SwiGLU experts,
    sum_k w_k * down_k(silu(gate_k(x)) * up_k(x)) (reference math: `kernels/moe.py` `GroupedMoE`).

    Each residual add is left to the next norm (`Norm.add_norm`, one fused pass where the backend has it):
    a block takes the stream and the previous block's pending FFN output and returns its own pair."""

    def __init__(self, attn_norm: Norm, attn: Attention, ffn_norm: Norm, ffn: MLP | MoEBlock) -> None:
        self.attn_norm, self.attn, self.ffn_norm, self.ffn = attn_norm, attn, ffn_norm, ffn

    def __call__(self, x: torch.Tensor, pending: torch.Tensor | None,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, pending) -> (x', ffn output): the residual stream is x' + ffn output."""
        with stage("attention"):
            x, h = self.attn_norm.add_norm(x, pending)
            x, h = self.ffn_norm.add_norm(x, self.attn(h, meta))
        return x, self.ffn(h)
