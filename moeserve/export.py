"""Write a GGUF file from a trained PyTorch Qwen3-MoE and a byte-level BPE tokenizer.

The inverse of what the engine reads: tensors get llama.cpp's names and layouts, metadata gets
the `qwen3moe.*` keys llama.cpp's converter writes, and the vocabulary is stored the way
`convert_hf_to_gguf.py` stores a Qwen tokenizer (`tokenizer.ggml.model = "gpt2"`, `pre = "qwen2"`,
control tokens typed 3), so the file loads in moeserve *and* in llama.cpp.

    from moeserve.export import Vocab, export_qwen3moe
    export_qwen3moe("model.gguf", model.state_dict(), model.config, Vocab.from_tokenizer(tok))

The state dict uses HF `Qwen3MoeForCausalLM` names, in either layout transformers has used:
fused experts (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I],
transformers >= 5) or one module per expert (`mlp.experts.{e}.gate_proj.weight`, ...).

Quantization: the large matrices (embeddings, output, attention, experts) are written in `qtype`
(Q8_0 by default, via gguf-py's quantizer, so the bytes are exactly what llama.cpp's converter
would write); norms are F32; the router is `router_qtype` (F32 by default: it is tiny, and routing
decisions are the part of an MoE most sensitive to rounding).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as QT

from moeserve.chat_template import CHATML_TEMPLATE
from moeserve.errors import MoeServeError
from moeserve.gguf.quants import quantize_np

__all__ = ["ExportError", "Vocab", "export_qwen3moe", "CHATML_TEMPLATE", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's control tokens, ChatML

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
_FILE_TYPE = {QT.F32: LlamaFileType.ALL_F32, QT.F16: LlamaFileType.MOSTLY_F16, QT.BF16: LlamaFileType.MOSTLY_BF16,
              QT.Q8_0: LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: LlamaFileType.MOSTLY_Q4_0,
              QT.Q4_1: LlamaFileType.MOSTLY_Q4_1, QT.Q5_0: LlamaFileType.MOSTLY_Q5_0,
              QT.Q5_1: LlamaFileType.MOSTLY_Q5_1}


class ExportError(MoeServeError, ValueError):
    """The model or tokenizer cannot be written as a qwen3moe GGUF (missing tensor, bad config...)."""


@dataclass
class Vocab:
    """A byte-level BPE vocabulary as GGUF stores it (`tokenizer.ggml.*`)."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # "left right", in rank order
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    pre: str = "qwen2"
    add_bos: bool = False
    chat_template: str | None = CHATML_TEMPLATE

    @classmethod
    def from_tokenizer(cls, tok: Any, *, bos: str | None = "<|endoftext|>", eos: str | None = "<|im_end|>",
                       pad: str | None = "<|endoftext|>", pre: str = "qwen2",
                       chat_template: str | None = CHATML_TEMPLATE) -> Vocab:
        """From a `tokenizers.Tokenizer` with a byte-level BPE model.

        Special added tokens become control tokens (type 3); `bos`/`eos`/`pad` name tokens that
        must exist in the vocabulary (None to leave an id unset).
        """
        spec = json.loads(tok.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ExportError(f"tokenizer model is {model.get('type')!r}; only byte-level BPE can be exported")
        vocab: dict[str, int] = dict(model["vocab"])
        special = set()
        for added in spec.get("added_tokens") or []:
            vocab[added["content"]] = added["id"]
            if added.get("special"):
                special.add(added["content"])
        n = max(vocab.values()) + 1
        tokens: list[str | None] = [None] * n
        for text, i in vocab.items():
            tokens[i] = text
        missing = [i for i, t in enumerate(tokens) if t is None]
        if missing:
            raise ExportError(f"tokenizer vocabulary has holes at ids {missing[:5]}")
        types = [TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

        def tid(text: str | None) -> int | None:
            if text is None:
                return None
            if text not in vocab:
                raise ExportError(f"special token {text!r} is not in the tokenizer vocabulary")
            return vocab[text]

        return cls(tokens=list(tokens), token_types=types, merges=merges, bos_token_id=tid(bos),
                   eos_token_id=tid(eos), pad_token_id=tid(pad), pre=pre, chat_template=chat_template)

    @classmethod
    def synthetic(cls, size: int) -> Vocab:
        """The small Qwen-style vocabulary `moeserve.testing` writes into random models."""
        from moeserve.testing import byte_level_vocab

        tokens, types, merges = byte_level_vocab(size)
        return cls(tokens=tokens, token_types=types, merges=merges, bos_token_id=tokens.index("<|endoftext|>"),
                   eos_token_id=tokens.index("<|im_end|>"), pad_token_id=tokens.index("<|endoftext|>"))

    def padded(self, n: int) -> Vocab:
        """The vocabulary padded with unused `[PAD{i}]` tokens to `n` entries (the embedding rows)."""
        if n < len(self.tokens):
            raise ExportError(f"tokenizer has {len(self.tokens)} tokens but the model's vocab_size is {n}")
        extra = n - len(self.tokens)
        return Vocab(self.tokens + [f"[PAD{len(self.tokens) + i}]" for i in range(extra)],
                     self.token_types + [TOKEN_UNUSED] * extra, self.merges, self.bos_token_id, self.eos_token_id,
                     self.pad_token_id, self.pre, self.add_bos, self.chat_template)

    def write(self, w: GGUFWriter) -> None:
        """Add the `tokenizer.*` keys to a GGUF writer."""
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        w.add_token_merges(self.merges)
        if self.bos_token_id is not None:
            w.add_bos_token_id(self.bos_token_id)
        if self.eos_token_id is not None:
            w.add_eos_token_id(self.eos_token_id)
        if self.pad_token_id is not None:
            w.add_pad_token_id(self.pad_token_id)
        w.add_add_bos_token(self.add_bos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cfg:
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_used: int
    expert_ffn: int
    ffn: int
    rms_eps: float
    rope_theta: float
    context_length: int
    tied: bool
    sliding_window: int | None


def _read_config(config: Any) -> _Cfg:
    """Normalise an HF `Qwen3MoeConfig` (or a mapping with the same keys) and check it fits GGUF."""
    c: dict[str, Any] = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    for key in ("head_dim", "num_experts", "rope_theta"):  # HF config attributes that to_dict() may omit or alias
        if c.get(key) is None and getattr(config, key, None) is not None:
            c[key] = getattr(config, key)
    if c.get("num_experts") is None:
        c["num_experts"] = c.get("num_local_experts")

    def need(key: str) -> Any:
        if c.get(key) is None:
            raise ExportError(f"model config has no '{key}'")
        return c[key]

    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"rope_type {rope.get('rope_type')!r} is not supported by the qwen3moe export")
    theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
    if c.get("norm_topk_prob") is False:
        raise ExportError("norm_topk_prob=False cannot be expressed in GGUF (llama.cpp always renormalises top-k)")
    if c.get("mlp_only_layers") or (c.get("decoder_sparse_step") or 1) != 1:
        raise ExportError("every layer must be an MoE layer (mlp_only_layers=[], decoder_sparse_step=1)")
    if c.get("shared_expert_intermediate_size"):
        raise ExportError("shared experts are not part of qwen3moe")
    n_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    return _Cfg(vocab_size=need("vocab_size"), hidden=hidden, n_layers=need("num_hidden_layers"), n_heads=n_heads,
                n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=c.get("head_dim") or hidden // n_heads,
                n_experts=need("num_experts"), n_used=need("num_experts_per_tok"),
                expert_ffn=need("moe_intermediate_size"),
                ffn=c.get("intermediate_size") or need("moe_intermediate_size"),
                rms_eps=float(c.get("rms_norm_eps") or 1e-6), rope_theta=float(theta),
                context_length=c.get("max_position_embeddings") or 4096,
                tied=bool(c.get("tie_word_embeddings", False)), sliding_window=window or None)


# --------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------


def _np(t: Any) -> np.ndarray:
    """float32 numpy copy of a torch tensor or array (detached, on CPU)."""
    if hasattr(t, "detach"):
        t = t.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(t, dtype=np.float32)


def _gguf_tensors(sd: Mapping[str, Any], c: _Cfg) -> list[tuple[str, np.ndarray, str]]:
    """(gguf name, float32 array in torch order, kind) with kind in matrix/norm/router."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}  # torch.compile'd modules

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in sd:
            raise ExportError(f"state dict has no tensor '{name}'")
        a = _np(sd[name])
        if a.shape != shape:
            raise ExportError(f"tensor '{name}' has shape {list(a.shape)}, expected {list(shape)}")
        return a

    H, hd, E, I_ = c.hidden, c.head_dim, c.n_experts, c.expert_ffn
    out = [("token_embd.weight", get("model.embed_tokens.weight", (c.vocab_size, H)), "matrix"),
           ("output_norm.weight", get("model.norm.weight", (H,)), "norm")]
    if not c.tied:
        out.append(("output.weight", get("lm_head.weight", (c.vocab_size, H)), "matrix"))
    for i in range(c.n_layers):
        q, p = f"model.layers.{i}.", f"blk.{i}."
        out += [
            (p + "attn_norm.weight", get(q + "input_layernorm.weight", (H,)), "norm"),
            (p + "attn_q.weight", get(q + "self_attn.q_proj.weight", (c.n_heads * hd, H)), "matrix"),
            (p + "attn_k.weight", get(q + "self_attn.k_proj.weight", (c.n_kv_heads * hd, H)), "matrix"),
            (p + "attn_v.weight", get(q + "self_attn.v_proj.weight", (c.n_kv_heads * hd, H)), "matrix"),
            (p + "attn_output.weight", get(q + "self_attn.o_proj.weight", (H, c.n_heads * hd)), "matrix"),
            (p + "attn_q_norm.weight", get(q + "self_attn.q_norm.weight", (hd,)), "norm"),
            (p + "attn_k_norm.weight", get(q + "self_attn.k_norm.weight", (hd,)), "norm"),
            (p + "ffn_norm.weight", get(q + "post_attention_layernorm.weight", (H,)), "norm"),
            (p + "ffn_gate_inp.weight", get(q + "mlp.gate.weight", (E, H)), "router"),
        ]
        if q + "mlp.experts.gate_up_proj" in sd:  # transformers >= 5: fused [E, 2I, H]
            gate_up = get(q + "mlp.experts.gate_up_proj", (E, 2 * I_, H))
            gate, up = gate_up[:, :I_], gate_up[:, I_:]
            down = get(q + "mlp.experts.down_proj", (E, H, I_))
        else:  # one nn.Linear per expert
            gate = np.stack([get(q + f"mlp.experts.{e}.gate_proj.weight", (I_, H)) for e in range(E)])
            up = np.stack([get(q + f"mlp.experts.{e}.up_proj.weight", (I_, H)) for e in range(E)])
            down = np.stack([get(q + f"mlp.experts.{e}.down_proj.weight", (H, I_)) for e in range(E)])
        out += [(p + "ffn_gate_exps.weight", np.ascontiguousarray(gate), "matrix"),
                (p + "ffn_up_exps.weight", np.ascontiguousarray(up), "matrix"),
                (p + "ffn_down_exps.weight", np.ascontiguousarray(down), "matrix")]
    return out


def export_qwen3moe(path: str | Path, state_dict: Mapping[str, Any], config: Any, vocab: Vocab, *,
                    qtype: QT = QT.Q8_0, router_qtype: QT = QT.F32, name: str = "moeserve-qwen3moe",
                    context_length: int | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `state_dict` (HF Qwen3-MoE names) + `vocab` to a `qwen3moe` GGUF at `path`.

    `config` is an HF `Qwen3MoeConfig` or a mapping with its keys. `context_length` overrides
    `max_position_embeddings` (e.g. the sequence length the model was trained at). `metadata`
    adds `general.*` string keys (e.g. {"general.license": "PSF-2.0"}).
    """
    qtype, router_qtype = QT(qtype), QT(router_qtype)
    c = _read_config(config)
    if qtype not in _FILE_TYPE:
        raise ExportError(f"cannot quantize to {qtype.name}; choose one of {', '.join(q.name for q in _FILE_TYPE)}")
    for dim, what in ((c.hidden, "hidden_size"), (c.expert_ffn, "moe_intermediate_size"),
                      (c.n_heads * c.head_dim, "num_attention_heads*head_dim")):
        if qtype not in (QT.F32, QT.F16, QT.BF16) and dim % 32:
            raise ExportError(f"{what}={dim} is not a multiple of 32, required by {qtype.name} blocks")
    tensors = _gguf_tensors(state_dict, c)
    vocab = vocab.padded(c.vocab_size)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), "qwen3moe")
    w.add_name(name)
    for key, value in (metadata or {}).items():
        w.add_string(key, str(value))
    w.add_file_type(int(_FILE_TYPE[qtype]))
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(context_length or c.context_length)
    w.add_embedding_length(c.hidden)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.ffn)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_eps)
    w.add_expert_count(c.n_experts)
    w.add_expert_used_count(c.n_used)
    w.add_expert_feed_forward_length(c.expert_ffn)
    if c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    vocab.write(w)
    for gname, arr, kind in tensors:
        qt = QT.F32 if kind == "norm" else router_qtype if kind == "router" else qtype
        w.add_tensor(gname, quantize_np(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
