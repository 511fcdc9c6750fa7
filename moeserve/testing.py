"""Write random-weight GGUF models of any shape and quant mix, and build HF references for them.

Tests and benchmarks make their own models with `write_model` — nothing is downloaded. Weights
are random but valid blocks (K-quants included, which gguf-py cannot quantize), scaled like a
trained network (std ~ 1/sqrt(fan_in)) so activations and logits have realistic magnitudes.
Every file carries a small byte-level BPE vocabulary (Qwen-style, with ChatML control tokens)
so that llama.cpp can load it too.

`hf_reference(path)` builds the matching HF transformers model from the file's *dequantized*
tensors: the independent reference the parity tests compare against.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from tqdm import tqdm

from moeserve.gguf.quants import random_quant_bytes, row_bytes

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class ModelSpec:
    """Shape and quant mix of a synthetic model. `qtypes` maps tensor-name globs to types."""

    arch: str = "qwen3moe"
    vocab_size: int = 512
    hidden_size: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    n_experts: int = 8
    n_experts_used: int = 2
    expert_ffn: int = 256
    ffn: int = 512  # dense archs
    tied: bool = False
    qtype: QT = QT.F32
    qtypes: dict[str, QT] = field(default_factory=dict)
    context_length: int = 4096
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    sliding_window: int | None = None
    seed: int = 0
    embed_scale: float = 1.0

    def type_of(self, name: str) -> QT:
        for pattern, qt in self.qtypes.items():
            if fnmatch.fnmatchcase(name, pattern):
                return qt
        return self.qtype


def byte_level_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A valid GPT-2 style vocab of `size` tokens: 256 bytes, merged pairs, ChatML specials."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]  # index i -> the unicode char standing for byte bs[i]
    tokens = list(byte_chars)
    merges: list[str] = []
    common = [chr(c) for c in b"etaoinshrdlu"] + ["Ġ"]
    for a in common:
        for b in common:
            if len(tokens) >= size - len(SPECIAL_TOKENS):
                break
            if a + b not in tokens:
                tokens.append(a + b)
                merges.append(f"{a} {b}")
    i = 0
    while len(tokens) < size - len(SPECIAL_TOKENS):
        tokens.append(f"<|unused_{i}|>")
        i += 1
    types = [1] * len(tokens)  # filler tokens stay normal: unreachable by merges, cheap to load
    tokens += list(SPECIAL_TOKENS)
    types += [3] * len(SPECIAL_TOKENS)
    return tokens, types, merges


def _tensor_shapes(s: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, torch-order shape) of every tensor the architecture has."""
    H, hd = s.hidden_size, s.head_dim
    names: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (s.vocab_size, H)), ("output_norm.weight", (H,))]
    if not s.tied:
        names.append(("output.weight", (s.vocab_size, H)))
    for i in range(s.n_layers):
        p = f"blk.{i}."
        names += [(p + "attn_norm.weight", (H,)), (p + "ffn_norm.weight", (H,)),
                  (p + "attn_q.weight", (s.n_heads * hd, H)), (p + "attn_k.weight", (s.n_kv_heads * hd, H)),
                  (p + "attn_v.weight", (s.n_kv_heads * hd, H)), (p + "attn_output.weight", (H, s.n_heads * hd))]
        if s.arch in ("qwen3", "qwen3moe"):
            names += [(p + "attn_q_norm.weight", (hd,)), (p + "attn_k_norm.weight", (hd,))]
        if s.arch == "qwen2":
            names += [(p + "attn_q.bias", (s.n_heads * hd,)), (p + "attn_k.bias", (s.n_kv_heads * hd,)),
                      (p + "attn_v.bias", (s.n_kv_heads * hd,))]
        if s.arch == "qwen3moe":
            E, I = s.n_experts, s.expert_ffn
            names += [(p + "ffn_gate_inp.weight", (E, H)), (p + "ffn_gate_exps.weight", (E, I, H)),
                      (p + "ffn_up_exps.weight", (E, I, H)), (p + "ffn_down_exps.weight", (E, H, I))]
        else:
            names += [(p + "ffn_gate.weight", (s.ffn, H)), (p + "ffn_up.weight", (s.ffn, H)),
                      (p + "ffn_down.weight", (H, s.ffn))]
    return names


def _random_tensor(s: ModelSpec, name: str, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, QT]:
    if len(shape) == 1:  # norms and biases: F32 around their natural value
        base = 0.0 if name.endswith(".bias") else 1.0
        return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32), QT.F32
    qt = s.type_of(name)
    scale = s.embed_scale if name == "token_embd.weight" else shape[-1] ** -0.5
    if name.endswith("ffn_gate_inp.weight"):
        scale *= 4.0  # a router with confident preferences, as trained ones have
    return random_quant_bytes(qt, shape, rng, scale=scale), qt


def write_model(path: str | Path, spec: ModelSpec | None = None, progress: bool = False, **overrides: object) -> Path:
    """Write a random-weight GGUF for `spec` (fields can be overridden by keyword) to `path`."""
    s = spec or ModelSpec()
    if overrides:
        s = ModelSpec(**{**s.__dict__, **overrides})
    path = Path(path)
    rng = np.random.default_rng(s.seed)
    w = GGUFWriter(str(path), s.arch)
    a = s.arch
    w.add_name(f"moeserve-random-{a}")
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden_size)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_rope_freq_base(s.rope_theta)
    w.add_vocab_size(s.vocab_size)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    if a == "qwen3moe":
        w.add_expert_count(s.n_experts)
        w.add_expert_used_count(s.n_experts_used)
        w.add_expert_feed_forward_length(s.expert_ffn)
    tokens, types, merges = byte_level_vocab(s.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    # Stream: declare every tensor first, then generate and write one at a time, so a file of any
    # size (an 18 GB Qwen3-30B-A3B-shaped one) never has more than one tensor in memory.
    shapes = _tensor_shapes(s)
    for name, shape in shapes:
        qt = QT.F32 if len(shape) == 1 else s.type_of(name)
        byte_shape = (*shape[:-1], row_bytes(qt, shape[-1])) if len(shape) > 1 else (shape[0] * 4,)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in tqdm(shapes, desc=f"writing {path.name}", unit="tensor", disable=not progress):
        data, _ = _random_tensor(s, name, shape, rng)
        w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    w.close()
    return path


def rewrite_gguf(src: str | Path, dst: str | Path, *, keys: Mapping[str, Any] | None = None,
                 tensors: Mapping[str, tuple[np.ndarray, QT] | None] | None = None) -> Path:
    """Copy a GGUF with some metadata keys or tensors changed, added or dropped: what tests of bad files need.

    `keys` maps a key to `(value, value_type, sub_type)` (set or added) or None (dropped); `tensors` maps a
    name to `(data, qtype)` (replaced in place or added at the end) or None (dropped).
    """
    from gguf import GGUFReader

    keys, tensors = dict(keys or {}), dict(tensors or {})
    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = keys.pop(key) if key in keys else (f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
        if value is not None:
            w.add_key_value(key, value[0], value[1], sub_type=value[2])
    for key, value in keys.items():
        if value is not None:
            w.add_key_value(key, value[0], value[1], sub_type=value[2])
    for t in r.tensors:
        data = tensors.pop(t.name) if t.name in tensors else (np.asarray(t.data), t.tensor_type)
        if data is not None:
            w.add_tensor(t.name, data[0], raw_dtype=data[1])
    for name, data in tensors.items():
        if data is not None:
            w.add_tensor(name, data[0], raw_dtype=data[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def smoke_model(name: str = "smoke") -> str:
    """A tiny random MoE (2 layers, hidden 256, 8 experts top-2) in a fresh temporary directory: what the
    benchmark scripts run when no model is given (a smoke test of the script, not a measurement)."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / f"{name}-tiny.gguf"
    write_model(path, ModelSpec(n_layers=2, hidden_size=256, vocab_size=512, n_experts=8, n_experts_used=2))
    return str(path)


def hf_reference(path: str | Path, device: str = "cpu", dtype: Any = None,
                 attn: str = "eager"):  # -> transformers.PreTrainedModel
    """The HF transformers model for a GGUF file, built from its dequantized tensors (float32 by default).

    Independent of moeserve's forward pass: only the GGUF reader and reference dequantizer are
    shared. llama q/k rows are un-permuted (the GGUF converter permutes them for interleaved RoPE).
    `device`/`dtype`/`attn` build the baseline of benchmarks/gpu_bench.py (cuda, bfloat16, sdpa): each
    tensor is then dequantized on the device, one at a time.
    """
    import torch
    import transformers

    from moeserve.gguf.config import load_config
    from moeserve.gguf.reader import GGUFFile, PackedTensor

    f = GGUFFile(path)
    c = load_config(f)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.rms_eps,
                  max_position_embeddings=c.context_length, tie_word_embeddings=c.tied_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})
    if c.arch == "qwen3moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=c.n_experts,
                                          num_experts_per_tok=c.n_experts_used, norm_topk_prob=True,
                                          moe_intermediate_size=c.expert_intermediate_size,
                                          intermediate_size=max(c.intermediate_size, 1), decoder_sparse_step=1,
                                          mlp_only_layers=[], sliding_window=c.sliding_window,
                                          use_sliding_window=c.sliding_window is not None)
        model_cls = transformers.Qwen3MoeForCausalLM
    elif c.arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=c.head_dim, intermediate_size=c.intermediate_size)
        model_cls = transformers.Qwen3ForCausalLM
    elif c.arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, intermediate_size=c.intermediate_size)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**common, head_dim=c.head_dim, intermediate_size=c.intermediate_size)
        model_cls = transformers.LlamaForCausalLM
    cfg.head_dim = c.head_dim  # not every config class takes it as an argument
    cfg._attn_implementation = attn
    dtype = dtype or torch.float32
    with torch.device(device):
        model = model_cls(cfg).to(dtype).eval()

    def t(name: str) -> torch.Tensor:
        w = f.tensor(name)
        return PackedTensor(w.name, w.qtype, w.shape, w.data.to(device)).dequantize().to(dtype)

    def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    sd = {"model.embed_tokens.weight": t("token_embd.weight"), "model.norm.weight": t("output_norm.weight")}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if c.tied_embeddings else t("output.weight")
    for i in range(c.n_layers):
        p, q = f"blk.{i}.", f"model.layers.{i}."
        wq, wk = t(p + "attn_q.weight"), t(p + "attn_k.weight")
        if c.arch == "llama":
            wq, wk = unpermute(wq, c.n_heads), unpermute(wk, c.n_kv_heads)
        sd |= {q + "input_layernorm.weight": t(p + "attn_norm.weight"),
               q + "post_attention_layernorm.weight": t(p + "ffn_norm.weight"),
               q + "self_attn.q_proj.weight": wq, q + "self_attn.k_proj.weight": wk,
               q + "self_attn.v_proj.weight": t(p + "attn_v.weight"),
               q + "self_attn.o_proj.weight": t(p + "attn_output.weight")}
        if c.qk_norm:
            sd[q + "self_attn.q_norm.weight"] = t(p + "attn_q_norm.weight")
            sd[q + "self_attn.k_norm.weight"] = t(p + "attn_k_norm.weight")
        if c.qkv_bias:
            for x in "qkv":
                sd[q + f"self_attn.{x}_proj.bias"] = t(p + f"attn_{x}.bias")
        if c.is_moe:
            sd[q + "mlp.gate.weight"] = t(p + "ffn_gate_inp.weight")
            sd[q + "mlp.experts.gate_up_proj"] = torch.cat(
                (t(p + "ffn_gate_exps.weight"), t(p + "ffn_up_exps.weight")), dim=1)
            sd[q + "mlp.experts.down_proj"] = t(p + "ffn_down_exps.weight")
        else:
            sd[q + "mlp.gate_proj.weight"] = t(p + "ffn_gate.weight")
            sd[q + "mlp.up_proj.weight"] = t(p + "ffn_up.weight")
            sd[q + "mlp.down_proj.weight"] = t(p + "ffn_down.weight")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing={missing} unexpected={unexpected}")
    return model
