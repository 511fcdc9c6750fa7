"""`TritonBackend`: the GPU backend — Triton kernels on the packed GGUF blocks; the default on CUDA.

What each operation gets:

* linears: `qmatmul.TritonLinear` — the file's blocks repacked once at load (exact, about the file's size),
  dequantized in registers by a GEMV path (decode) or a tiled GEMM (prefill); float weights use cuBLAS.
* the MoE block: `fused_moe.TritonMoE` — router product (decode: in the routing launch), softmax/top-k on
  the device, (token, slot) pairs sorted into per-expert blocks on the device, gate+up (SiLU·mul) in one launch
  and down in one launch for all experts, a deterministic weighted sum.
* attention: `attention.TritonPagedAttention` — one kernel for prefill chunks and decode rows over the
  paged pool through the block tables.
* RMSNorm: `norm.py`, one kernel (residual add fused) — or, in decode steps of a row or two, none: the q/k/v
  products and the MoE's routing launch take the norm of their input themselves (`fuse_norm`).
* the q/k/v projection: `qkv.py`, the products finishing every head in their epilogue (QK-norm, RoPE, and the
  step's k/v stored into the layer's pool slots), one launch.
* the embedding lookup: `qmatmul.TritonEmbedding`, the step's rows dequantized from the packed copy, one launch.
* the dense FFN: `mlp.TritonMLP` — gate|up as one product, SiLU·mul in one kernel, down.

Activations meet the weights as fp16 in the products (float32 accumulation and outputs), except where they
are not a normed row: the SwiGLU product the FFN down projections read (dense `mlp` and the MoE's down kernel)
can pass fp16's 65,504 in real checkpoints, so those products run in TF32 (`qmatmul.group_dot`'s WIDE), as do
BF16 expert stacks' gate/up (TF32 holds bf16 exactly).

Nothing in a forward synchronises with the host and every shape depends only on the step's batch, so the
model runner can capture decode steps in CUDA graphs (`graph_safe`). On a CPU the same kernels run under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how CI tests this backend without a GPU.
"""

from __future__ import annotations

import os

import torch

from moeserve.errors import RequestError
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.backend import Backend, Linear
from moeserve.kernels.reference import EmbeddingRows
from moeserve.kernels.rope import Rope
from moeserve.kernels.triton.packing import GROUP


def check_runtime(device: torch.device) -> None:
    """Triton compiles for a GPU; on a CPU only its interpreter runs the kernels (one clear error otherwise)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RequestError("the triton kernels run on a GPU; on a CPU set TRITON_INTERPRET=1 before starting "
                           "(Triton's interpreter, for tests) or use kernels='cpu'")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RequestError("kernels='triton' needs the triton package (pip install triton)") from None


class TritonBackend(Backend):
    name = "triton"
    graph_safe = True  # no host synchronisation inside a forward: decode steps may be captured in CUDA graphs
    moe_col_unit = GROUP  # the fused MoE's K loop takes whole 32-weight groups, float stacks included

    def __init__(self, device: torch.device | str = "cuda") -> None:
        super().__init__(device)
        check_runtime(self.device)
        from moeserve.kernels.triton.pdl import pdl_enabled

        pdl_enabled(self.device)  # probes PDL once, now: not inside a later CUDA-graph capture

    def upload(self, w: PackedTensor) -> PackedTensor:
        """The file's bytes on the device for one kernel to repack: not kept (unlike `place`), so a weight
        costs its repacked size alone once loaded, not twice."""
        return w if w.data.device == self.device else PackedTensor(w.name, w.qtype, w.shape, w.data.to(self.device))

    def linear(self, w: PackedTensor, bias: torch.Tensor | None = None) -> Linear:
        from moeserve.kernels.triton.qmatmul import TritonLinear

        return TritonLinear(self.upload(w), bias)

    def mlp(self, gate: Linear, up: Linear, down: Linear):  # noqa: ANN201
        from moeserve.kernels.triton.mlp import TritonMLP

        return TritonMLP(gate, up, down)  # gate|up in one launch, SiLU·mul in one, a TF32 down

    def qkv(self, layer: int, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None,
            k_norm: torch.Tensor | None, rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int,
            eps: float):  # noqa: ANN201
        from moeserve.kernels.triton.qkv import TritonQKV
        from moeserve.kernels.triton.qmatmul import TritonLinear

        qkv = TritonQKV(layer, wq, wk, wv, q_norm, k_norm, rope, n_heads, n_kv_heads, head_dim, eps)
        # q, k and v in one launch when they share a quant type; else q and k (Q4_K_M's Q6_K attn_v layers)
        fused = TritonLinear.stacked([wq, wk, wv])
        if fused is not None:
            qkv.stack(fused, with_v=True)
        elif (fused := TritonLinear.stacked([wq, wk])) is not None:
            qkv.stack(fused, with_v=False)
        return qkv

    def attention(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int, window: int | None):  # noqa: ANN201
        from moeserve.kernels.triton.attention import TritonPagedAttention

        return TritonPagedAttention(layer, n_heads, n_kv_heads, head_dim, window)

    def moe(self, router: PackedTensor, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
            renormalize: bool):  # noqa: ANN201
        from moeserve.kernels.triton.fused_moe import TritonMoE

        return TritonMoE(self.linear(router), self.upload(gate), self.upload(up), self.upload(down), top_k,
                         renormalize)

    def norm(self, weight: torch.Tensor, eps: float):  # noqa: ANN201
        from moeserve.kernels.triton.norm import TritonRMSNorm

        return TritonRMSNorm(weight, eps)

    def fuse_norm(self, norm: object, consumer: object) -> None:
        """The q/k/v epilogue path and the MoE's routing launch take their norm in decode steps of up to
        `norm.FUSE_MAX_ROWS` rows (`norm.PendingNorm`): one launch fewer each, per layer."""
        from moeserve.kernels.triton.norm import TritonRMSNorm

        if isinstance(norm, TritonRMSNorm) and getattr(consumer, "takes_pending_norm", False):
            norm.fuse = True

    def embedding(self, w: PackedTensor):  # noqa: ANN201
        from moeserve.kernels.triton.packing import packable
        from moeserve.kernels.triton.qmatmul import TritonEmbedding

        if packable(w):
            return TritonEmbedding(self.upload(w))  # the step's rows from the packed copy, one launch
        return EmbeddingRows(self.place(w))  # gathers and dequantizes only the step's rows, on the device
