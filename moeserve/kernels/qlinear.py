"""Matrix products on packed GGUF weights.

`QLinear` (one matrix) and `QExperts` (a stack of expert matrices) are the only way the model
touches a weight. Each holds the packed bytes and computes `x @ W.T` through a backend:

* `reference` — dequantize the one matrix (or the one expert) needed by this call to float32 and
  multiply. Exact, slow, obviously right: every fast kernel is tested against it.
* fast backends (see `moeserve.kernels.fast`) — exact repacks of the same blocks into layouts
  that fast kernels consume. Selected with `MOESERVE_KERNELS=reference|fast` or `LLM(kernels=...)`.

Nothing here ever dequantizes more than one matrix or one expert at a time.
"""

from __future__ import annotations

import torch

from moeserve.gguf.quants import dequantize
from moeserve.gguf.reader import PackedTensor


class QLinear:
    """y = x @ W.T (+ b) for a packed `[out, in]` weight."""

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None = None) -> None:
        if len(weight.shape) != 2:
            raise ValueError(f"QLinear needs a 2-D weight, '{weight.name}' is {weight.shape}")
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.fast = None  # a prepared fast kernel, attached by kernels.fast.prepare_linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            y = self.fast(x)
        else:
            y = reference_matmul(x, self.weight.data, self.weight)
        return y if self.bias is None else y + self.bias


class QExperts:
    """A stack of expert matrices `[E, out, in]`, stored as one packed tensor.

    `__call__(e, x)` multiplies by expert `e` only; the stack is never dequantized as a whole.
    """

    def __init__(self, weight: PackedTensor) -> None:
        if len(weight.shape) != 3:
            raise ValueError(f"QExperts needs a 3-D weight, '{weight.name}' is {weight.shape}")
        self.weight = weight
        self.n_experts, self.out_features, self.in_features = weight.shape
        self.fast = None  # a prepared fast kernel: fast(e, x)

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            return self.fast(e, x)
        return reference_matmul(x, self.weight.data[e], self.weight)


def reference_matmul(x: torch.Tensor, raw: torch.Tensor, w: PackedTensor) -> torch.Tensor:
    """float32 `x @ dequant(raw).T`: the plain implementation every fast kernel is held to."""
    weight = dequantize(raw, w.qtype, w.shape[-1])
    return x.float() @ weight.T
