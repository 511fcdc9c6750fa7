"""The decoder: embeddings, N blocks, final norm, lm_head — loaded from a GGUF file.

Qwen3-MoE, Qwen3, Qwen2 and Llama differ only in switches of `ModelConfig` (MoE or dense FFN,
QK-norm, qkv bias, RoPE layout), so one loader builds all four from the same layers. Every tensor is
checked for presence, shape and quant type as it is wired in, and every operation is asked of the
backend here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from moeserve.gguf.config import ModelConfig, load_config
from moeserve.gguf.reader import GGUFFile, PackedTensor
from moeserve.kernels.backend import Backend, Embedding, Linear, MLPBlock, MoEBlock, Norm
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.model.layers import Attention, Block
from moeserve.model.parallel import (
    ExpertParallelMoE,
    Reduced,
    Shard,
    VocabHead,
    ZeroFFN,
    col_unit,
    held_bytes,
    plan_heads,
    resident,
    split,
    take_cols,
    take_rows,
)
from moeserve.profiler import stage


class Decoder:
    def __init__(self, config: ModelConfig, embed: Embedding, blocks: list[Block], norm: Norm, lm_head: Linear,
                 max_positions: int, device: torch.device, argmax: Callable[[torch.Tensor], torch.Tensor],
                 graph_safe: bool = False, batch_invariant: bool = False, kv_heads: int | None = None,
                 shard: Shard | None = None,
                 greedy_head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.config, self.embed, self.blocks, self.norm, self.lm_head = config, embed, blocks, norm, lm_head
        # final hidden states -> greedy token ids: the argmax of the logits (a split vocabulary compares each
        # rank's best instead of gathering its logits)
        self.greedy_head = greedy_head or (lambda h: argmax(lm_head(h).float()))
        self.shard = shard or Shard()  # this process's place in a parallel group (rank 0 of 1 when alone)
        # the KV pool's shape: this rank's KV heads (all of them unless attention is split over ranks)
        self.cache_config = replace(config, n_kv_heads=kv_heads) if kv_heads not in (None, config.n_kv_heads) \
            else config
        self.max_positions = max_positions  # the RoPE tables' length: no position may reach it
        self.device = device  # where activations and the KV pool live
        self.argmax = argmax  # the backend's greedy kernel, for the sampler
        self.graph_safe = graph_safe  # no host sync in forward: the runner may capture decode steps (CUDA graphs)
        self.batch_invariant = batch_invariant  # a row's logits never depend on the other rows of its step

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, meta: AttentionMetadata,
                logit_rows: torch.Tensor | None = None, argmax: bool = False) -> torch.Tensor:
        """float32 logits [R, vocab] of `logit_rows` of the flattened step (all rows when None); with `argmax`,
        their greedy token ids [R] (int64) instead."""
        x, pending = self._residual(ids, meta)
        if logit_rows is not None:
            x, pending = x[logit_rows], None if pending is None else pending[logit_rows]
        with stage("lm_head"):
            _, h = self.norm.add_norm(x, pending)
            return self.greedy_head(h) if argmax else self.lm_head(h).float()

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """float32 [T, hidden]: every row's final hidden state after the final norm (the lm_head's input)."""
        return self.norm.add_norm(*self._residual(ids, meta))[1].float()

    def _residual(self, ids: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The residual stream after the last block, as (stream, the last block's FFN output still to add)."""
        x, pending = self.embed(ids), None
        for block in self.blocks:
            x, pending = block(x, pending, meta)
        return x, pending


def load_decoder(f: GGUFFile, backend: Backend, config: ModelConfig | None = None,
                 max_positions: int = 4096, shard: Shard | None = None) -> Decoder:
    """Wire the packed tensors of `f` into a Decoder of `backend`'s kernels, validating every tensor.

    With a `shard` of a parallel group, only this rank's slices are taken (`model/parallel.py`) and the
    kernels that end a split are wrapped with their collective; the layers' forward does not change."""
    cfg = config or load_config(f)
    sh = shard or Shard()
    H, hd, nh, nkv, eps = cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.rms_eps
    held: list[PackedTensor | torch.Tensor] = []

    def vector(name: str, size: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        v = backend.vector(f.tensor(name, (size,)))[lo:hi]
        held.append(v)
        return v

    def packed(w: PackedTensor) -> PackedTensor:
        if sh.parallel and backend.device.type == "cpu":  # this rank's slice, in its own (huge-page) memory
            w = resident(w)
        held.append(w)
        return w

    def rows_linear(name: str, out: int, inp: int, lo: int, hi: int, bias: bool = False) -> Linear:
        """Output rows [lo, hi) of a (out, inp) matrix (all of them when not split)."""
        w = f.tensor(name, (out, inp))
        b = vector(name.replace(".weight", ".bias"), out, lo, hi) if bias else None
        return backend.linear(packed(take_rows(w, lo, hi) if (lo, hi) != (0, out) else w), b)

    freq_factors = f.tensor("rope_freqs.weight", (cfg.rope_dim // 2,)).dequantize() \
        if f.has("rope_freqs.weight") else None
    rope = backend.rope(cfg.rope_dim, cfg.rope_theta, cfg.rope_neox, max_positions, freq_factors)
    plan = None
    if sh.parallel:
        plan = plan_heads(nh, nkv, hd, col_unit(f.tensor("blk.0.attn_output.weight", (H, nh * hd))), sh)
    sh.attention_split = plan is not None
    q0, q1, k0, k1 = (plan.q0, plan.q1, plan.k0, plan.k1) if plan else (0, nh, 0, nkv)
    blocks = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        qkv = backend.qkv(
            i, rows_linear(p + "attn_q.weight", nh * hd, H, q0 * hd, q1 * hd, cfg.qkv_bias),
            rows_linear(p + "attn_k.weight", nkv * hd, H, k0 * hd, k1 * hd, cfg.qkv_bias),
            rows_linear(p + "attn_v.weight", nkv * hd, H, k0 * hd, k1 * hd, cfg.qkv_bias),
            vector(p + "attn_q_norm.weight", hd) if cfg.qk_norm else None,
            vector(p + "attn_k_norm.weight", hd) if cfg.qk_norm else None,
            rope, q1 - q0, k1 - k0, hd, eps)
        wo = f.tensor(p + "attn_output.weight", (H, nh * hd))
        o_proj: Linear = backend.linear(packed(take_cols(wo, q0 * hd, q1 * hd) if plan else wo))
        if plan:
            o_proj = Reduced(o_proj, sh)
        attn = Attention(qkv, backend.attention(i, q1 - q0, k1 - k0, hd, cfg.sliding_window), o_proj)
        ffn = _moe(f, backend, cfg, p, sh, packed) if cfg.is_moe else _mlp(f, backend, cfg, p, sh, packed)
        attn_norm, ffn_norm = (backend.norm(vector(p + n, H), eps) for n in ("attn_norm.weight", "ffn_norm.weight"))
        backend.fuse_norm(attn_norm, qkv)  # each norm's output goes to one op alone
        backend.fuse_norm(ffn_norm, ffn)
        blocks.append(Block(attn_norm, attn, ffn_norm, ffn))
    V = cfg.vocab_size
    cuts = split(V, sh.size)
    v0, v1 = cuts[sh.rank], cuts[sh.rank + 1]
    # The embedding is whole on every rank: a lookup reads T rows, while splitting it would cost an all-reduce
    # per step. The lm_head (a full read per step) is split by vocabulary rows.
    embed_w = packed(f.tensor("token_embd.weight", (V, H)))
    embed: Embedding = backend.embedding(embed_w)
    if cfg.tied_embeddings:
        head: Linear = backend.linear(take_rows(embed_w, v0, v1) if sh.parallel else embed_w)
    else:
        head = rows_linear("output.weight", V, H, v0, v1)
    greedy_head = None
    if sh.parallel:
        head = VocabHead(head, cuts, sh, backend.argmax)
        greedy_head = head.argmax
    sh.held_bytes = held_bytes(*{id(t): t for t in held}.values())
    return Decoder(cfg, embed, blocks, backend.norm(vector("output_norm.weight", H), eps), head,
                   max_positions, backend.device, backend.argmax, backend.graph_safe and not sh.parallel,
                   backend.batch_invariant, kv_heads=k1 - k0, shard=sh, greedy_head=greedy_head)


def _moe(f: GGUFFile, backend: Backend, cfg: ModelConfig, p: str, sh: Shard, packed: Callable) -> MoEBlock:
    """This rank's MoE: all experts, whole experts [e0, e1) (expert parallel), or every expert's columns cut."""
    E, I, H = cfg.n_experts, cfg.expert_intermediate_size, cfg.hidden_size
    router = packed(f.tensor(p + "ffn_gate_inp.weight", (E, H)))
    gate = f.tensor(p + "ffn_gate_exps.weight", (E, I, H))
    up = f.tensor(p + "ffn_up_exps.weight", (E, I, H))
    down = f.tensor(p + "ffn_down_exps.weight", (E, H, I))
    k, renorm = cfg.n_experts_used, cfg.norm_topk_prob
    if not sh.parallel:
        return backend.moe(router, packed(gate), packed(up), packed(down), top_k=k, renormalize=renorm)
    if sh.expert_parallel:
        cuts = split(E, sh.size)
        e0, e1 = cuts[sh.rank], cuts[sh.rank + 1]
        local = backend.moe(router, *(packed(take_rows(w, e0, e1)) for w in (gate, up, down)), top_k=k,
                            renormalize=renorm)
        return ExpertParallelMoE(backend.linear(router), local, e0, e1, k, renorm, sh)
    cuts = split(I, sh.size, max(col_unit(down), backend.moe_col_unit))  # whole blocks, and the backend's groups
    i0, i1 = cuts[sh.rank], cuts[sh.rank + 1]
    if i0 == i1:
        return Reduced(ZeroFFN(), sh)
    return Reduced(backend.moe(router, packed(take_rows(gate, i0, i1, axis=1)), packed(take_rows(up, i0, i1, axis=1)),
                               packed(take_cols(down, i0, i1)), top_k=k, renormalize=renorm), sh)


def _mlp(f: GGUFFile, backend: Backend, cfg: ModelConfig, p: str, sh: Shard, packed: Callable) -> MLPBlock:
    """This rank's dense SwiGLU FFN: rows of gate/up and the matching columns of down (all when not split)."""
    F_, H = cfg.intermediate_size, cfg.hidden_size
    gate, up = f.tensor(p + "ffn_gate.weight", (F_, H)), f.tensor(p + "ffn_up.weight", (F_, H))
    down = f.tensor(p + "ffn_down.weight", (H, F_))
    if not sh.parallel:
        return backend.mlp(*(backend.linear(packed(w)) for w in (gate, up, down)))
    cuts = split(F_, sh.size, col_unit(down))
    i0, i1 = cuts[sh.rank], cuts[sh.rank + 1]
    if i0 == i1:
        return Reduced(ZeroFFN(), sh)
    return Reduced(backend.mlp(backend.linear(packed(take_rows(gate, i0, i1))),
                               backend.linear(packed(take_rows(up, i0, i1))),
                               backend.linear(packed(take_cols(down, i0, i1)))), sh)
