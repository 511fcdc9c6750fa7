"""The model configuration, read from GGUF metadata and checked against the tensors.

One frozen dataclass describes every decoder moeserve runs. The four supported architectures
share the same layers and differ only in a few switches (QK-norm, qkv bias, RoPE style, MoE),
which is why one `ModelConfig` — not a class per architecture — is enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeserve.errors import GGUFError
from moeserve.gguf.reader import GGUFFile

SUPPORTED_ARCHS = ("qwen3moe", "qwen3", "qwen2", "llama")
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_dim: int
    context_length: int
    intermediate_size: int = 0  # dense FFN width (unused by MoE layers)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_intermediate_size: int = 0
    sliding_window: int | None = None
    tied_embeddings: bool = False

    # -- architecture switches, derived so they can never disagree with `arch` -------------
    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises each q/k head (RMSNorm over head_dim) before RoPE."""
        return self.arch in ("qwen3", "qwen3moe")

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    @property
    def rope_neox(self) -> bool:
        """NEOX (rotate-half) RoPE; llama GGUFs permute q/k rows and use interleaved pairs."""
        return self.arch != "llama"

    @property
    def norm_topk_prob(self) -> bool:
        """GGUF has no key for it; llama.cpp hard-codes renormalisation for qwen3moe."""
        return True

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads


def load_config(f: GGUFFile) -> ModelConfig:
    """Parse and validate the config of `f`; errors name the file and the key."""
    arch = f.architecture
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(
            f"{f.path}: unknown architecture '{arch}' (general.architecture); supported: "
            + ", ".join(SUPPORTED_ARCHS)
        )

    def key(name: str, default: object = ..., kind: type = int) -> object:
        full = f"{arch}.{name}"
        return f.get(full, kind=kind) if default is ... else f.get(full, default, kind=kind)

    hidden = key("embedding_length")
    n_heads = key("attention.head_count")
    n_kv = key("attention.head_count_kv", n_heads)
    head_dim = key("attention.key_length", hidden // n_heads if n_heads else 0)
    value_dim = key("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{f.path}: {arch}.attention.value_length={value_dim} != key_length={head_dim}; not supported")
    for name, val in (("embedding_length", hidden), ("attention.head_count", n_heads),
                      ("attention.head_count_kv", n_kv), ("attention.key_length", head_dim)):
        if val <= 0:
            raise GGUFError(f"{f.path}: {arch}.{name} must be positive, found {val}")
    if n_heads % n_kv:
        raise GGUFError(f"{f.path}: {arch}.attention.head_count={n_heads} is not a multiple of head_count_kv={n_kv}")

    n_experts = key("expert_count", 0) if arch == "qwen3moe" else 0
    n_used = key("expert_used_count", 0) if arch == "qwen3moe" else 0
    if arch == "qwen3moe":
        if n_experts <= 0:
            raise GGUFError(f"{f.path}: missing metadata key '{arch}.expert_count'")
        if not 0 < n_used <= n_experts:
            raise GGUFError(f"{f.path}: {arch}.expert_used_count={n_used} must be in 1..expert_count={n_experts}")

    embd = f.tensor("token_embd.weight")
    vocab = key("vocab_size", embd.shape[0])
    if embd.shape != (vocab, hidden):
        raise GGUFError(
            f"{f.path}: tensor 'token_embd.weight' has shape {list(embd.shape)}, expected {[vocab, hidden]}")
    window = key("attention.sliding_window", 0)
    cfg = ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rms_eps=key("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=key("rope.freq_base", 10000.0, kind=float),
        rope_dim=key("rope.dimension_count", head_dim),
        context_length=key("context_length", DEFAULT_MAX_CONTEXT),
        intermediate_size=key("feed_forward_length", 0),
        n_experts=n_experts,
        n_experts_used=n_used,
        expert_intermediate_size=_expert_ffn(f, arch) if n_experts else 0,
        sliding_window=window or None,
        tied_embeddings=not f.has("output.weight"),
    )
    if cfg.n_layers <= 0:
        raise GGUFError(f"{f.path}: {arch}.block_count must be positive, found {cfg.n_layers}")
    for name, val in (("context_length", cfg.context_length), ("attention.layer_norm_rms_epsilon", cfg.rms_eps),
                      ("rope.freq_base", cfg.rope_theta), ("rope.dimension_count", cfg.rope_dim)):
        if not (val > 0 and math.isfinite(val)):  # NaN fails too
            raise GGUFError(f"{f.path}: {arch}.{name} must be a positive finite number, found {val}")
    for name, val in (("feed_forward_length", cfg.intermediate_size), ("attention.sliding_window", window),
                      ("expert_feed_forward_length", cfg.expert_intermediate_size)):
        if val < 0:
            raise GGUFError(f"{f.path}: {arch}.{name} must not be negative, found {val}")
    if n_experts and cfg.expert_intermediate_size <= 0:
        raise GGUFError(f"{f.path}: {arch}.expert_feed_forward_length must be positive for an MoE model")
    # The head geometry sizes RoPE tables and the KV pool: check it against the first layer's tensors (whose
    # bytes the file must hold) before anything is allocated from it.
    for name, rows in (("attn_q", n_heads * head_dim), ("attn_k", n_kv * head_dim), ("attn_v", n_kv * head_dim)):
        f.tensor(f"blk.0.{name}.weight", (rows, hidden))
    if cfg.rope_dim > head_dim or cfg.rope_dim % 2:
        raise GGUFError(f"{f.path}: {arch}.rope.dimension_count={cfg.rope_dim} invalid for head_dim {head_dim}")
    return cfg


def _expert_ffn(f: GGUFFile, arch: str) -> int:
    """expert_feed_forward_length, or the width of the first expert stack when the key is absent."""
    value = f.get(f"{arch}.expert_feed_forward_length", 0, kind=int)
    if value:
        return value
    return f.tensor("blk.0.ffn_gate_exps.weight").shape[1]
