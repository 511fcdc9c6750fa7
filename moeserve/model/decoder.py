"""The decoder: embeddings, N blocks, final norm, lm_head — loaded from a GGUF file.

Qwen3-MoE, Qwen3, Qwen2 and Llama differ only in switches of `ModelConfig` (MoE or dense FFN,
QK-norm, qkv bias, RoPE layout), so one loader builds all four from the same layers.
Every tensor is checked for presence, shape and quant type as it is wired in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from moeserve.gguf.config import ModelConfig, load_config
from moeserve.gguf.reader import GGUFFile, PackedTensor
from moeserve.kernels.qlinear import QExperts, QLinear
from moeserve.kernels.rope import Rope
from moeserve.model.layers import MLP, Attention, BatchKV, Block, MoE, SeqSlice, rms_norm
from moeserve.profiler import stage


class Decoder:
    def __init__(self, config: ModelConfig, embed: PackedTensor, blocks: list[Block], norm: torch.Tensor,
                 lm_head: QLinear) -> None:
        self.config, self.embed, self.blocks, self.norm, self.lm_head = config, embed, blocks, norm, lm_head
        self.embed_rows: Callable[[torch.Tensor], torch.Tensor] | None = None  # kernels.fast: row lookup

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, seqs: list[SeqSlice],
                logit_rows: torch.Tensor | None = None, batch: BatchKV | None = None) -> torch.Tensor:
        """Logits [R, vocab] for `logit_rows` of the flattened batch (all rows when None).

        `batch`: for a decode step (one token per sequence), the sequences' caches as one object,
        so that attention writes, gathers and attends for all of them in one call per layer.
        """
        x = self.embed_rows(ids) if self.embed_rows is not None else self.embed.rows(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, positions, seqs, i, batch)
        if logit_rows is not None:
            x = x[logit_rows]
        with stage("lm_head"):
            return self.lm_head(rms_norm(x, self.norm, self.config.rms_eps)).float()

    def linears(self) -> Iterator[QLinear | QExperts]:
        """Every packed matmul weight (for the fast-kernel backends to prepare)."""
        for b in self.blocks:
            a = b.attn
            yield from (a.wq, a.wk, a.wv, a.wo)
            f = b.ffn
            yield from ((f.router, f.gate, f.up, f.down) if isinstance(f, MoE) else (f.gate, f.up, f.down))
        yield self.lm_head


def _vector(f: GGUFFile, name: str, size: int, device: torch.device) -> torch.Tensor:
    return f.tensor(name, (size,)).dequantize().to(device)


def load_decoder(f: GGUFFile, config: ModelConfig | None = None, device: torch.device | str = "cpu",
                 max_positions: int = 4096) -> Decoder:
    """Wire the packed tensors of `f` into a Decoder, validating every name, shape and type."""
    cfg = config or load_config(f)
    device = torch.device(device)
    H, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    def packed(name: str, shape: tuple[int, ...]) -> PackedTensor:
        t = f.tensor(name, shape)
        return t if device.type == "cpu" else PackedTensor(t.name, t.qtype, t.shape, t.data.to(device))

    def linear(name: str, out: int, inp: int, bias: bool = False) -> QLinear:
        b = _vector(f, name.replace(".weight", ".bias"), out, device) if bias else None
        return QLinear(packed(name, (out, inp)), b)

    freq_factors = f.tensor("rope_freqs.weight").dequantize() if f.has("rope_freqs.weight") else None
    rope = Rope(cfg.rope_dim, cfg.rope_theta, cfg.rope_neox, max_positions, device, freq_factors)
    blocks = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        attn = Attention(
            wq=linear(p + "attn_q.weight", nh * hd, H, cfg.qkv_bias),
            wk=linear(p + "attn_k.weight", nkv * hd, H, cfg.qkv_bias),
            wv=linear(p + "attn_v.weight", nkv * hd, H, cfg.qkv_bias),
            wo=linear(p + "attn_output.weight", H, nh * hd),
            q_norm=_vector(f, p + "attn_q_norm.weight", hd, device) if cfg.qk_norm else None,
            k_norm=_vector(f, p + "attn_k_norm.weight", hd, device) if cfg.qk_norm else None,
            n_heads=nh, n_kv_heads=nkv, head_dim=hd, eps=cfg.rms_eps, rope=rope, window=cfg.sliding_window,
        )
        if cfg.is_moe:
            E, I = cfg.n_experts, cfg.expert_intermediate_size
            ffn: MLP | MoE = MoE(
                router=linear(p + "ffn_gate_inp.weight", E, H),
                gate=QExperts(packed(p + "ffn_gate_exps.weight", (E, I, H))),
                up=QExperts(packed(p + "ffn_up_exps.weight", (E, I, H))),
                down=QExperts(packed(p + "ffn_down_exps.weight", (E, H, I))),
                top_k=cfg.n_experts_used, renormalize=cfg.norm_topk_prob,
            )
        else:
            F_ = cfg.intermediate_size
            ffn = MLP(linear(p + "ffn_gate.weight", F_, H), linear(p + "ffn_up.weight", F_, H),
                      linear(p + "ffn_down.weight", H, F_))
        blocks.append(Block(_vector(f, p + "attn_norm.weight", H, device), attn,
                            _vector(f, p + "ffn_norm.weight", H, device), ffn, cfg.rms_eps))
    embed = packed("token_embd.weight", (cfg.vocab_size, H))
    head = QLinear(embed) if cfg.tied_embeddings else linear("output.weight", cfg.vocab_size, H)
    return Decoder(cfg, embed, blocks, _vector(f, "output_norm.weight", H, device), head)
