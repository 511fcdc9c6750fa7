"""The kernel backend interface: the model asks a backend for each operation once, at load.

A backend is a factory of kernel objects. While loading, every layer asks it for the kernels it
needs — a linear on a packed weight, the q/k/v projection with QK-norm and RoPE, attention over the
paged KV pool, the whole MoE block (or a dense SwiGLU FFN, `mlp`), RMSNorm, embedding rows — and keeps
exactly one object per operation. A layer's forward then calls its objects and never asks which backend made
them (the pattern of vLLM's `CustomOp`: one op, a native implementation and per-platform ones).

Backends (chosen by `kernels/select.py` `select_backend`):

* `reference` (`kernels/reference.py`) — plain torch on any device: dequantize the one matrix or
  expert a call needs, multiply in float32, SDPA attention. The oracle every other backend is
  tested against (tests/test_parity_hf.py runs the same suite on each backend).
* `cpu` (`kernels/cpu/`) — the native AVX2 kernels (`torch.ops.moeserve.*`) on the GGUF blocks in
  place; the default on a CPU. Shapes it has no kernel for fall back to the reference objects.
* `triton` (`kernels/triton/`) — Triton kernels on the packed blocks; the default on a GPU, and under
  Triton's interpreter (`TRITON_INTERPRET=1`) on a CPU for tests.

Every kernel object is reentrant: it holds only what load gave it, so two threads may call the
same model at once (`LLM.logits` beside a running server).

Batch invariance (`batch_invariant`): a backend built with it (`select_backend(..., batch_invariant=True)`, only
the cpu backend offers it) makes kernel objects whose result for one row of a step depends on that row alone
(and, for attention, on its sequence's keys), never on how many other rows share the call: the same request
gives bitwise the same logits, hence the same greedy tokens, alone or among any number of others, however the
scheduler chunks its prompt. The choice is made here, at load, by the objects the backend hands out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.kernels.rope import Rope


class Linear(Protocol):
    """`y = x @ W.T (+ b)`: x [..., in] any float dtype -> y [..., out] float32."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class QKVProjection(Protocol):
    """`(h [T, H], meta) -> (q [T, nh, hd], k [T, nkv, hd], v [T, nkv, hd])`: an attention layer's q/k/v
    projections, per-head QK RMSNorm (Qwen3) and RoPE at `meta.positions`.

    k and v are None when the projection stored them in the step's pool slots itself (a step with a pool and a
    slot mapping, where a backend fuses the store into its QK-norm/RoPE kernel); attention then reads the pool."""

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor | None, ...]: ...


class Attention(Protocol):
    """`(q, k, v, meta) -> o [T, nh * hd]`: writes the step's k/v into the paged pool (slot mapping; k/v None:
    the projection did) and attends every row to its sequence's keys (causal, optional sliding window)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                 meta: AttentionMetadata) -> torch.Tensor: ...


class MoEBlock(Protocol):
    """`h [T, H] -> out [T, H]` float32: router, top-k, experts (SwiGLU) and their weighted sum.

    `mix(h, weights [T, j], experts [T, j])` is the weighted sum alone, for routing decided elsewhere
    (an expert-parallel rank routes over all experts and mixes the pairs that land on its own)."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...

    def mix(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor: ...


class MLPBlock(Protocol):
    """`h [T, H] -> out [T, H]` float32: a dense SwiGLU FFN."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...


class Norm(Protocol):
    """RMSNorm over the last dim, in float32.

    `add_norm(x, delta)` is the pre-norm residual step, `s = x + delta` then `(s, norm(s))` (`delta` None: `(x,
    norm(x))`): one pass over the row where a backend fuses it, the same float32 sum either way."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...


class Embedding(Protocol):
    """`ids [T] -> rows [T, H]` float32, dequantizing only the rows asked for."""

    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...


class Backend(ABC):
    """A factory of kernel objects for one device (see the module docstring)."""

    name: str
    graph_safe = False  # True when a forward never synchronises with the host (CUDA graphs may capture it)
    batch_invariant = False  # True when every kernel's result for a row is independent of the other rows
    moe_col_unit = 1  # columns a tensor-parallel cut of an expert's FFN must fall on, beyond the quant block's

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._placed: dict[str, PackedTensor] = {}  # tied embeddings serve two kernels from one copy

    def place(self, w: PackedTensor) -> PackedTensor:
        """The packed weight on this backend's device (the file's bytes, moved once at load)."""
        if w.data.device == self.device:
            return w
        if w.name not in self._placed:
            self._placed[w.name] = PackedTensor(w.name, w.qtype, w.shape, w.data.to(self.device))
        return self._placed[w.name]

    def vector(self, w: PackedTensor) -> torch.Tensor:
        """A small 1-D tensor (norm weight, bias) as float32 on the device."""
        return w.dequantize().to(self.device)

    @abstractmethod
    def linear(self, w: PackedTensor, bias: torch.Tensor | None = None) -> Linear: ...

    def rope(self, rope_dim: int, theta: float, neox: bool, max_positions: int,
             freq_factors: torch.Tensor | None = None) -> Rope:
        """The cos/sin tables on this backend's device (its q/k kernels read them)."""
        return Rope(rope_dim, theta, neox, max_positions, self.device, freq_factors)

    @abstractmethod
    def qkv(self, layer: int, wq: Linear, wk: Linear, wv: Linear, q_norm: torch.Tensor | None,
            k_norm: torch.Tensor | None, rope: Rope, n_heads: int, n_kv_heads: int, head_dim: int,
            eps: float) -> QKVProjection:
        """The q/k/v projection of layer `layer` (its slice of the KV pool), built from linears this backend made."""

    @abstractmethod
    def attention(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int,
                  window: int | None) -> Attention: ...

    @abstractmethod
    def moe(self, router: PackedTensor, gate: PackedTensor, up: PackedTensor, down: PackedTensor, top_k: int,
            renormalize: bool) -> MoEBlock:
        """The MoE block: router `[E, H]`, expert stacks gate/up `[E, I, H]` and down `[E, H, I]`."""

    def mlp(self, gate: Linear, up: Linear, down: Linear) -> MLPBlock:
        """A dense SwiGLU FFN `down(silu(gate(x)) * up(x))` over linears this backend made."""
        from moeserve.model.layers import MLP

        return MLP(gate, up, down)

    @abstractmethod
    def norm(self, weight: torch.Tensor, eps: float) -> Norm: ...

    def fuse_norm(self, norm: Norm, consumer: object) -> None:
        """Told at load that `consumer` (a kernel object of this backend, or a wrapper around one) takes `norm`'s
        output and nothing else does: a backend may then let the consumer's own kernel take the norm (triton:
        decode steps of a row or two). The default does nothing."""
        return None

    @abstractmethod
    def embedding(self, w: PackedTensor) -> Embedding: ...

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Row-wise argmax of float32 logits [R, V] (greedy sampling): the first maximum, NaN wins."""
        return torch.argmax(x, dim=-1)
