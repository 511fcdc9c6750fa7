"""Mixture-of-experts routing and grouped dispatch.

Routing: softmax over all experts in float32, keep the top-k, renormalise (Qwen3-MoE).
Dispatch: the (token, slot) pairs are sorted by expert so each *chosen* expert runs once over all
of its tokens — one GEMM per active expert, as llama.cpp's mul_mat_id and vLLM's
moe_align_block_size do. There is no loop over all experts and no per-token loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeserve.profiler import stage


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def group_by_expert(
    experts: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """Sort the T*k (token, slot) pairs by expert.

    Returns (order, token_of_pair, segments) where `order` indexes the flattened [T*k] pairs in
    expert order, `token_of_pair[i]` is the token of the i-th sorted pair, and `segments` lists
    (expert, start, end) for each expert that received at least one token.
    """
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    active = counts.nonzero().flatten()
    ends = counts.cumsum(0)[active]
    starts = ends - counts[active]
    segments = list(zip(active.tolist(), starts.tolist(), ends.tolist()))
    return order, order // experts.shape[1], segments


def grouped_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, n_experts: int,
                expert_fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_i w_i * expert_{e_i}(x) for every token, each active expert run once on its rows."""
    order, tokens, segments = group_by_expert(experts, n_experts)
    w_sorted = weights.reshape(-1)[order]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e, s, t in segments:
        rows = tokens[s:t]
        y = expert_fn(e, x[rows])
        with stage("weighted_sum"):
            out.index_add_(0, rows, y.float() * w_sorted[s:t, None])
    return out


class GroupedMoE:
    """The reference MoE block: router -> softmax/top-k -> grouped experts (SwiGLU) -> weighted sum.

    `router` is any backend's linear; `gate`/`up`/`down` are expert kernels `(e, x) -> x @ W[e].T`.
    Backends with a fused path subclass this and fall back to `__call__` where it does not apply.
    """

    def __init__(self, router, gate, up, down, top_k: int, renormalize: bool = True) -> None:  # noqa: ANN001
        self.router, self.gate, self.up, self.down = router, gate, up, down
        self.n_experts, self.top_k, self.renormalize = gate.n_experts, top_k, renormalize

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)) for expert e."""
        with stage("expert_gate"):
            g = self.gate(e, x)
        with stage("expert_up"):
            u = self.up(e, x)
        with stage("expert_down"):
            return self.down(e, F.silu(g) * u)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        with stage("router"):
            weights, experts = route(self.router(h), self.top_k, self.renormalize)
        return grouped_moe(h, weights, experts, self.n_experts, self.expert)

    def mix(self, h: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The experts' weighted sum for routing decided elsewhere (an expert-parallel rank routes over all
        experts and mixes the pairs of its own): weights/experts [T, j] -> out [T, H] float32."""
        return grouped_moe(h, weights, experts, self.n_experts, self.expert)
