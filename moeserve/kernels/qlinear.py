"""Reference matrix products on packed GGUF weights: the plain implementation every fast kernel is held to.

`ReferenceLinear` (one matrix) and `ReferenceExperts` (a stack of expert matrices) dequantize the
one matrix — or the one expert — a call needs to float32 and multiply. Exact, slow, obviously right.
Nothing here ever dequantizes more than one matrix or one expert at a time.
"""

from __future__ import annotations

import torch

from moeserve.gguf.quants import dequantize
from moeserve.gguf.reader import PackedTensor


def reference_matmul(x: torch.Tensor, raw: torch.Tensor, w: PackedTensor) -> torch.Tensor:
    """float32 `x @ dequant(raw).T`."""
    weight = dequantize(raw, w.qtype, w.shape[-1])
    return x.float() @ weight.T


class ReferenceLinear:
    """y = x @ W.T (+ b) for a packed `[out, in]` weight."""

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None = None) -> None:
        if len(weight.shape) != 2:
            raise ValueError(f"a linear needs a 2-D weight, '{weight.name}' is {weight.shape}")
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = reference_matmul(x, self.weight.data, self.weight)
        return y if self.bias is None else y + self.bias


class ReferenceExperts:
    """A stack of expert matrices `[E, out, in]`: `(e, x) -> x @ W[e].T`, one expert dequantized per call."""

    def __init__(self, weight: PackedTensor) -> None:
        if len(weight.shape) != 3:
            raise ValueError(f"an expert stack needs a 3-D weight, '{weight.name}' is {weight.shape}")
        self.weight = weight
        self.n_experts, self.out_features, self.in_features = weight.shape

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return reference_matmul(x, self.weight.data[e], self.weight)


class WithBias:
    """`linear(x) + bias` around a kernel that has no bias of its own."""

    def __init__(self, linear, bias: torch.Tensor) -> None:  # noqa: ANN001 (any backend's Linear)
        self.linear, self.bias = linear, bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias
