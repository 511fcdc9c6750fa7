"""Rotary position embeddings, in both layouts GGUF models use.

* NEOX ("rotate half", Qwen2/Qwen3): dimension i pairs with i + d/2.
* normal (interleaved, llama): dimension 2i pairs with 2i + 1. llama GGUF converters permute the
  q/k rows so that this matches HF's rotate-half on the original weights.
Only the first `rope_dim` dimensions of each head rotate (partial RoPE); the rest pass through.

The cos/sin tables cover positions `0 .. max_pos - 1` and are built once, at load, and never change:
kernels read them while other threads may run (the engine never schedules a position past
`max_model_len`, and `LLM.logits` checks its length first).
"""

from __future__ import annotations

import torch


class Rope:
    def __init__(self, rope_dim: int, theta: float, neox: bool, max_pos: int, device: torch.device | str = "cpu",
                 freq_factors: torch.Tensor | None = None) -> None:
        self.rope_dim, self.neox = rope_dim, neox
        inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64).float() / rope_dim))
        if freq_factors is not None:  # llama-3 style per-frequency scaling (`rope_freqs.weight`)
            inv_freq = inv_freq / freq_factors.float()
        self.inv_freq = inv_freq.to(device)
        pos = torch.arange(max_pos, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(pos, self.inv_freq)  # [P, rope_dim/2]
        self.cos, self.sin = angles.cos(), angles.sin()

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate `x` [T, heads, head_dim] for absolute `positions` [T]."""
        cos = self.cos[positions].unsqueeze(1).to(x.dtype)  # [T, 1, d/2]
        sin = self.sin[positions].unsqueeze(1).to(x.dtype)
        d = self.rope_dim
        rot, rest = x[..., :d], x[..., d:]
        if self.neox:
            x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
