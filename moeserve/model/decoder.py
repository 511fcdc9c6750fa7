"""The decoder: embeddings, N blocks, final norm, lm_head — loaded from a GGUF file.

Qwen3-MoE, Qwen3, Qwen2 and Llama differ only in switches of `ModelConfig` (MoE or dense FFN,
QK-norm, qkv bias, RoPE layout), so one loader builds all four from the same layers. Every tensor is
checked for presence, shape and quant type as it is wired in, and every operation is asked of the
backend here, once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeserve.gguf.config import ModelConfig, load_config
from moeserve.gguf.reader import GGUFFile
from moeserve.kernels.backend import Backend, Embedding, Linear, MLPBlock, MoEBlock, Norm
from moeserve.kernels.metadata import AttentionMetadata
from moeserve.model.layers import Attention, Block
from moeserve.profiler import stage


class Decoder:
    def __init__(self, config: ModelConfig, embed: Embedding, blocks: list[Block], norm: Norm, lm_head: Linear,
                 max_positions: int, device: torch.device, argmax: Callable[[torch.Tensor], torch.Tensor],
                 graph_safe: bool = False, batch_invariant: bool = False) -> None:
        self.config, self.embed, self.blocks, self.norm, self.lm_head = config, embed, blocks, norm, lm_head
        self.max_positions = max_positions  # the RoPE tables' length: no position may reach it
        self.device = device  # where activations and the KV pool live
        self.argmax = argmax  # the backend's greedy kernel, for the sampler
        self.graph_safe = graph_safe  # no host sync in forward: the runner may capture decode steps (CUDA graphs)
        self.batch_invariant = batch_invariant  # a row's logits never depend on the other rows of its step

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, meta: AttentionMetadata,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits [R, vocab] of `logit_rows` of the flattened step (all rows when None)."""
        x = self._residual(ids, meta)
        if logit_rows is not None:
            x = x[logit_rows]
        with stage("lm_head"):
            return self.lm_head(self.norm(x)).float()

    @torch.inference_mode()
    def hidden_states(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """float32 [T, hidden]: every row's final hidden state after the final norm (the lm_head's input)."""
        return self.norm(self._residual(ids, meta)).float()

    def _residual(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The residual stream after the last block."""
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, meta)
        return x


def load_decoder(f: GGUFFile, backend: Backend, config: ModelConfig | None = None,
                 max_positions: int = 4096) -> Decoder:
    """Wire the packed tensors of `f` into a Decoder of `backend`'s kernels, validating every tensor."""
    cfg = config or load_config(f)
    H, hd, nh, nkv, eps = cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.rms_eps

    def vector(name: str, size: int) -> torch.Tensor:
        return backend.vector(f.tensor(name, (size,)))

    def linear(name: str, out: int, inp: int, bias: bool = False) -> Linear:
        b = vector(name.replace(".weight", ".bias"), out) if bias else None
        return backend.linear(f.tensor(name, (out, inp)), b)

    freq_factors = f.tensor("rope_freqs.weight", (cfg.rope_dim // 2,)).dequantize() \
        if f.has("rope_freqs.weight") else None
    rope = backend.rope(cfg.rope_dim, cfg.rope_theta, cfg.rope_neox, max_positions, freq_factors)
    blocks = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        qkv = backend.qkv(
            linear(p + "attn_q.weight", nh * hd, H, cfg.qkv_bias),
            linear(p + "attn_k.weight", nkv * hd, H, cfg.qkv_bias),
            linear(p + "attn_v.weight", nkv * hd, H, cfg.qkv_bias),
            vector(p + "attn_q_norm.weight", hd) if cfg.qk_norm else None,
            vector(p + "attn_k_norm.weight", hd) if cfg.qk_norm else None,
            rope, nh, nkv, hd, eps)
        attn = Attention(qkv, backend.attention(i, nh, nkv, hd, cfg.sliding_window),
                         linear(p + "attn_output.weight", H, nh * hd))
        if cfg.is_moe:
            E, I = cfg.n_experts, cfg.expert_intermediate_size
            ffn: MLPBlock | MoEBlock = backend.moe(
                f.tensor(p + "ffn_gate_inp.weight", (E, H)), f.tensor(p + "ffn_gate_exps.weight", (E, I, H)),
                f.tensor(p + "ffn_up_exps.weight", (E, I, H)), f.tensor(p + "ffn_down_exps.weight", (E, H, I)),
                top_k=cfg.n_experts_used, renormalize=cfg.norm_topk_prob)
        else:
            F_ = cfg.intermediate_size
            ffn = backend.mlp(linear(p + "ffn_gate.weight", F_, H), linear(p + "ffn_up.weight", F_, H),
                              linear(p + "ffn_down.weight", H, F_))
        blocks.append(Block(backend.norm(vector(p + "attn_norm.weight", H), eps), attn,
                            backend.norm(vector(p + "ffn_norm.weight", H), eps), ffn))
    embed = f.tensor("token_embd.weight", (cfg.vocab_size, H))
    head = backend.linear(embed) if cfg.tied_embeddings else linear("output.weight", cfg.vocab_size, H)
    return Decoder(cfg, backend.embedding(embed), blocks, backend.norm(vector("output_norm.weight", H), eps), head,
                   max_positions, backend.device, backend.argmax, backend.graph_safe, backend.batch_invariant)
