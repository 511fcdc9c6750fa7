#!/usr/bin/env python
"""Train moeserve's embedded default model: a tiny Qwen3-MoE on text that ships with Python.

    apt install python3-doc                     # Python's documentation sources (PSF-2.0), part of the corpus
    python scripts/train_tiny_moe.py            # ~58 min on 2 CPU cores; writes moeserve/data/

Corpus (PSF-2.0, the licence of CPython and its documentation):
  * `pydoc_data.topics` — the Python Language Reference topics that `help()` shows;
  * the docstrings of the standard library's pure-Python modules (functions, classes, modules),
    each preceded by its signature, so the model learns Python-doc-like text;
  * the Zen of Python (`this`);
  * Python's documentation sources as Debian's python3-doc ships them (tutorial, references, HOWTOs,
    FAQ, What's New, C API), minus every paragraph sharing 8 words with the held-out text;
  * a few thousand ChatML question/answer pairs made from the same docstrings ("What does
    `json.dumps` do?" -> its first paragraph), so `moeserve chat` has a conversation format.
Every document is assigned to train or held-out by a hash of its name (1 in 20 held out); the
held-out text is written to `moeserve/data/tiny-moe-heldout.txt` for `benchmarks/perplexity.py`.

Tokenizer: byte-level BPE trained with HF `tokenizers` on the training split, with the pre-
tokenizer regex llama.cpp uses for `tokenizer.ggml.pre = "qwen2"`, so moeserve and llama.cpp
split text exactly as in training (checked after export).

Model: Qwen3-MoE (QK-norm attention, GQA, NEOX RoPE, top-k routed SwiGLU experts with
renormalised weights) in a small PyTorch module whose state dict uses HF `Qwen3MoeForCausalLM`
names; if transformers is installed it is checked to compute the same logits as
`Qwen3MoeForCausalLM` before training. Exported with `moeserve.export` to Q8_0.

Reproducible: fixed seeds, a fixed step count and 2 threads; the corpus depends on the Python
version (recorded in the model card). Bitwise-identical weights need the same torch build too.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

# Threads that spin while waiting make 2-thread training several times slower than 1 thread when the
# cores are shared with other processes; passive waiting keeps 2 threads useful. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeserve.export import CHATML_TEMPLATE, SPECIAL_TOKENS, Vocab, export_qwen3moe  # noqa: E402
from moeserve.kernels.cpu.build import cpu_name  # noqa: E402

DATA = ROOT / "moeserve" / "data"
EOT = "<|endoftext|>"
TOKENIZER_CHAT_PAIRS = 600  # the tokenizer sees the first model's corpus: the same vocabulary, comparable perplexity


# --------------------------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------------------------


@dataclass
class Doc:
    name: str
    text: str


def _held_out(name: str, every: int) -> bool:
    return zlib.crc32(name.encode()) % every == 0


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        return f"class {node.name}({bases})" if bases else f"class {node.name}"
    args = ast.unparse(node.args)
    return f"{node.name}({args})"


def _first_paragraph(doc: str, limit: int = 400) -> str:
    para = doc.strip().split("\n\n")[0].strip()
    return para if len(para) <= limit else ""


def stdlib_docs() -> tuple[list[Doc], list[tuple[str, str]]]:
    """One document per stdlib module (its docstrings with signatures), plus (name, summary) pairs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo", "dist-packages"}
    docs, pairs = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        parts = []
        if d := ast.get_docstring(tree):
            parts.append(f"{module}\n{'=' * len(module)}\n\n{d}")

        def visit(body: list[ast.stmt], prefix: str, parts: list[str] = parts, module: str = module) -> None:
            for node in body:
                if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if node.name.startswith("_") and not node.name.startswith("__init__"):
                    continue
                d = ast.get_docstring(node)
                qual = f"{prefix}{node.name}"
                if d:
                    parts.append(f"{prefix}{_signature(node)}\n\n{d}")
                    if (p := _first_paragraph(d)) and len(p) > 40:
                        pairs.append((f"{module}.{qual}", p))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qual + ".")

        visit(tree.body, "")
        if parts:
            docs.append(Doc(f"stdlib:{module}", "\n\n".join(parts)))
    return docs, pairs


PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")  # Debian's python3-doc (PSF-2.0)
_SIG_DIRECTIVES = ("function", "method", "class", "attribute", "data", "exception", "decorator", "classmethod",
                   "staticmethod", "coroutinefunction", "coroutinemethod", "abstractmethod", "decoratormethod",
                   "describe", "opcode", "cmdoption", "envvar", "option", "pdbcommand", "module")
_VERSION_DIRECTIVES = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                       "deprecated": "Deprecated since version {}."}


def rst_to_text(rst: str) -> str:
    """Python's documentation source (reStructuredText) as the plain text `help()` would show.

    Roles and literals become "quoted" (pydoc's convention, so the docs read like the docstring
    corpus), signatures of API directives stay as a line of their own, version notes become
    sentences, other directive lines, options, labels and comments go.
    """
    import re

    role = re.compile(r":[\w:.+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
    link = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
    out: list[str] = []
    skip_indent: int | None = None
    for line in rst.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if skip_indent is not None:  # the body of a dropped block (comment, toctree, index, ...)
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".. "):
            m = re.match(r"\.\. ([\w:-]+)::\s*(.*)", stripped)
            if m is None:  # comment, label (.. _name:) or substitution
                skip_indent = indent
                continue
            kind, arg = m.group(1).split(":")[-1], m.group(2).strip()
            if kind in _SIG_DIRECTIVES and arg:
                out.append(" " * indent + arg)
            elif kind in _VERSION_DIRECTIVES:
                ver, _, rest = arg.partition(" ")
                out.append(" " * indent + " ".join(filter(None, (_VERSION_DIRECTIVES[kind].format(ver), rest))))
            elif kind in ("note", "warning", "seealso", "tip", "important", "caution", "impl-detail", "attention"):
                out.append(" " * indent + kind.replace("-", " ").capitalize() + (": " + arg if arg else ":"))
            elif kind in ("code-block", "sourcecode", "doctest", "testcode", "productionlist", "rubric",
                          "literalinclude", "highlight"):
                if kind == "rubric" and arg:
                    out.append(" " * indent + arg)
                elif kind not in ("code-block", "sourcecode", "doctest", "testcode"):
                    skip_indent = indent
            else:  # toctree, index, include, image, tabularcolumns, only, ...
                skip_indent = indent
            continue
        if re.match(r"\s*:[\w-]+:(\s.*)?$", line):  # directive options (:synopsis:, :noindex:, ...)
            continue
        if stripped == "::":
            continue
        if line.endswith("::"):
            line = line[:-1]
        line = role.sub(r'"\1"', line)
        line = link.sub(r"\1", line)
        line = re.sub(r"``([^`]+)``", r'"\1"', line)
        line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)
        line = line.replace("\\ ", "").replace("|", "") if "|" in line and line.count("|") == 2 else line
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _shingles(text: str, n: int = 8) -> set[int]:
    import re

    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def python_docs(root: Path, held: list[Doc]) -> tuple[list[Doc], int]:
    """Python's documentation (tutorial, library and language reference, HOWTOs, FAQ, What's New...).

    The library reference repeats many docstrings, so every paragraph that shares an 8-word
    sequence with the held-out text is dropped: the held-out set stays unseen. Returns the
    documents and how many paragraphs were dropped.
    """
    if not root.is_dir():
        raise SystemExit(f"{root} not found: install Debian's python3-doc (apt install python3-doc), or pass "
                         "--python-docs DIR (the _sources folder of Python's HTML docs), or --python-docs ''")
    banned = set().union(*(_shingles(d.text) for d in held))
    docs, dropped = [], 0
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix().removesuffix(".rst.txt")
        if rel.startswith(("includes/", "license", "copyright", "distutils/", "install/")):
            continue
        keep = []
        for para in rst_to_text(path.read_text(encoding="utf-8")).split("\n\n"):
            if _shingles(para) & banned:
                dropped += 1
            else:
                keep.append(para)
        if keep:
            docs.append(Doc(f"pydocs:{rel}", "\n\n".join(keep)))
    return docs, dropped


def build_corpus(holdout_every: int, n_chat: int, seed: int) -> tuple[list[Doc], list[Doc]]:
    import pydoc_data.topics

    docs = [Doc(f"topic:{k}", v.strip()) for k, v in sorted(pydoc_data.topics.topics.items())]
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    zen = "".join(this.d.get(c, c) for c in this.s)
    docs.append(Doc("zen", zen))
    mod_docs, pairs = stdlib_docs()
    docs += mod_docs
    train = [d for d in docs if not _held_out(d.name, holdout_every)]
    held = [d for d in docs if _held_out(d.name, holdout_every)]

    # ChatML pairs, only from training modules (the held-out text stays unseen).
    rng = random.Random(seed)
    held_modules = {d.name.removeprefix("stdlib:") for d in held}
    pairs = [(n, p) for n, p in pairs if n.rsplit(".", 1)[0] not in held_modules and
             not any(n.startswith(m + ".") for m in held_modules)]
    rng.shuffle(pairs)
    questions = ("What does {} do?", "Explain {}.", "What is {}?", "Tell me about {}.", "How do I use {}?")
    for i, (name, answer) in enumerate(pairs[:n_chat]):
        q = rng.choice(questions).format(f"`{name}`")
        text = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        train.append(Doc(f"chat:{i}", text))
    return train, held


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from moeserve.tokenizer import PRE_TOKENIZERS

    (regex,) = PRE_TOKENIZERS["qwen2"].regexes
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


# --------------------------------------------------------------------------------------------
# model: Qwen3-MoE with HF Qwen3MoeForCausalLM parameter names
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    vocab_size: int = 4096
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 3
    num_key_value_heads: int = 1
    head_dim: int = 64
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = True
    norm_topk_prob: bool = True

    def hf_dict(self) -> dict:
        return {**asdict(self), "intermediate_size": self.moe_intermediate_size, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta}}


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.hd, c.rms_norm_eps), RMSNorm(self.hd, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.nkv, self.hd)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)

        def rope(t: torch.Tensor) -> torch.Tensor:  # NEOX: rotate halves
            a, b = t.chunk(2, dim=-1)
            return t * cos + torch.cat((-b, a), dim=-1) * sin

        o = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Experts(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        E, I_, H = c.num_experts, c.moe_intermediate_size, c.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I_, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I_))


class SparseMoE(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.E, self.k = c.num_experts, c.num_experts_per_tok
        self.gate = nn.Linear(c.hidden_size, c.num_experts, bias=False)
        self.experts = Experts(c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).softmax(-1, dtype=torch.float32)
        w, idx = probs.topk(self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.E)
        rows = order // self.k  # token of each (sorted) assignment
        xs, outs, start = x[rows], [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                g, u = F.linear(xs[start:start + n], self.experts.gate_up_proj[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(g) * u, self.experts.down_proj[e]))
                start += n
        y = torch.cat(outs) * w.reshape(-1)[order, None]
        out = torch.zeros_like(x).index_add_(0, rows, y)
        # Switch-style load balancing: E * sum_e (fraction routed to e) * (mean router prob of e)
        aux = self.E * (counts.float() / flat.numel() * probs.mean(0)).sum()
        return out.view(shape), aux


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SparseMoE(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        y, aux = self.mlp(self.post_attention_layernorm(x))
        return x + y, aux


class Body(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TinyQwen3Moe(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.config = c
        self.model = Body(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        freqs = torch.outer(torch.arange(c.max_position_embeddings, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self._init(c)

    def _init(self, c: Config) -> None:
        std, out_std = 0.02, 0.02 / math.sqrt(2 * c.num_hidden_layers)
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = ids.shape[1]
        x = self.model.embed_tokens(ids)
        cos, sin = self.cos[:T], self.sin[:T]
        aux = x.new_zeros(())
        for layer in self.model.layers:
            x, a = layer(x, cos, sin)
            aux = aux + a
        return self.lm_head(self.model.norm(x)), aux / len(self.model.layers)


def check_against_hf(model: TinyQwen3Moe) -> str:
    """Load the weights into transformers' Qwen3MoeForCausalLM and compare logits."""
    try:
        import transformers
    except ImportError:
        return "skipped (transformers not installed)"
    c = model.config
    cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in c.hf_dict().items() if k != "rope_theta"})
    cfg._attn_implementation = "sdpa"
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq") and k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"state dict does not fit Qwen3MoeForCausalLM: missing={missing} unexpected={unexpected}")
    ids = torch.randint(0, c.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        ref = hf(ids).logits
    err = float((ours - ref).abs().max() / ref.abs().max())
    if err > 1e-4:
        raise SystemExit(f"training module differs from Qwen3MoeForCausalLM: max rel err {err:.2e}")
    return f"matches Qwen3MoeForCausalLM (max rel err {err:.1e})"


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def window_nll(model: TinyQwen3Moe, ids: list[int], ctx: int) -> tuple[float, int]:
    """Sum of NLL and count over non-overlapping `ctx` windows (first token of each unscored)."""
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for s in range(0, len(ids) - 1, ctx):
            w = torch.tensor(ids[s:s + ctx])[None]
            if w.shape[1] < 2:
                break
            logits, _ = model(w)
            total += float(F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum"))
            n += w.shape[1] - 1
    model.train()
    return total, n


def greedy(model: TinyQwen3Moe, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation (full recompute per token: fine for 48 tokens of a tiny model)."""
    ids = list(prompt)
    model.eval()
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor(ids[-model.config.max_position_embeddings:])[None])
            ids.append(int(logits[0, -1].argmax()))
    model.train()
    return ids[len(prompt):]


def unlikelihood(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al., 2019, "Neural Text Generation with Unlikelihood Training").

    Why: maximum likelihood alone leaves a small model's greedy text in loops (the first model's
    "x" or "x" or ...). This term lowers, at every position, the probability of the tokens already
    in the context that are not the next token: -sum log(1 - p(c)), summed over those candidates and
    averaged over positions. The paper trains with it from scratch at weight 1 and reports far fewer
    repeated n-grams in greedy text for a small rise in perplexity.
    """
    B, T, V = logits.shape
    seen = torch.zeros(B, T, V, dtype=logits.dtype).scatter_(2, inputs[..., None], 1.0).cumsum(1) > 0
    seen.scatter_(2, targets[..., None], False)
    p = logits.softmax(-1)
    return -(torch.log1p(-p.clamp(max=1 - 1e-5)) * seen).sum() / (B * T)


# Greedy continuations checked at each evaluation for loops ("The" is the check).
PROBES = ("The", "A", "In", "This function", "Return", "If the")


def probe_greedy(model: TinyQwen3Moe, tok, n: int = 48) -> dict[str, list[int]]:
    """Each probe's `n` greedy tokens (a loop: some 4-gram 3 or more times, `max_ngram_repeats`)."""
    return {p: greedy(model, tok.encode(p, add_special_tokens=False).ids, n) for p in PROBES}


def max_ngram_repeats(ids: list[int], n: int) -> int:
    """How often the most frequent n-gram occurs (the issue's loop check: < 3 for 4-grams in 48 tokens)."""
    from collections import Counter

    grams = Counter(tuple(ids[i:i + n]) for i in range(len(ids) - n + 1))
    return max(grams.values(), default=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=DATA / "moeserve-tiny-moe.gguf")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=384)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--unlikelihood", type=float, default=1.0,
                    help="weight of the token-level unlikelihood loss against repetition (0: off)")
    ap.add_argument("--select", action=argparse.BooleanOptionalAction, default=True,
                    help="export the evaluated checkpoint of the last quarter with the fewest looping probes\n"
                         "(then the lowest held-out perplexity) instead of always the final weights")
    ap.add_argument("--chat-pairs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python-docs", type=Path, default=PYTHON_DOCS,
                    help="Python's documentation sources (the _sources folder of its HTML docs); '' to train on the "
                         "docstring corpus alone")
    ap.add_argument("--eval-every", type=int, default=500,
                    help="log held-out loss and a greedy sample every N steps (monitoring only)")
    ap.add_argument("--no-card", action="store_true",
                    help="do not write MODEL_CARD.md, the held-out text and the licence (next to --out)")
    args = ap.parse_args()

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # corpus + tokenizer
    train_docs, held_docs = build_corpus(20, args.chat_pairs, args.seed)
    train_chars = sum(len(d.text) for d in train_docs)
    held_text = "\n\n".join(d.text for d in held_docs) + "\n"
    # The tokenizer is trained on the docstring corpus only, so its vocabulary (and with it the
    # meaning of a perplexity) is the same with or without the documentation added below.
    tok = train_tokenizer([d.text for d in train_docs if not d.name.startswith("chat:") or
                           int(d.name[5:]) < TOKENIZER_CHAT_PAIRS], args.vocab)
    if str(args.python_docs) not in ("", "."):
        extra, dropped = python_docs(args.python_docs, held_docs)
        print(f"python docs: {len(extra)} documents, {sum(len(d.text) for d in extra) / 1e6:.2f} M chars; "
              f"{dropped} paragraphs dropped for overlapping the held-out text", flush=True)
        train_docs += extra
        args.docs_dropped = dropped
        train_chars = sum(len(d.text) for d in train_docs)
    eot = tok.token_to_id(EOT)
    stream: list[int] = []
    order = list(range(len(train_docs)))
    random.Random(args.seed).shuffle(order)
    encoded = tok.encode_batch([train_docs[i].text for i in order], add_special_tokens=False)
    for e in encoded:
        stream += e.ids + [eot]
    data = torch.tensor(stream, dtype=torch.long)
    held_ids = tok.encode(held_text, add_special_tokens=False).ids
    print(f"corpus: {len(train_docs)} train docs ({train_chars / 1e6:.2f} M chars, {len(stream)} tokens); "
          f"{len(held_docs)} held-out docs ({len(held_ids)} tokens); vocab {tok.get_vocab_size()}", flush=True)

    # model
    c = Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
               num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
               num_experts=args.experts, moe_intermediate_size=args.expert_ffn, max_position_embeddings=args.seq_len)
    model = TinyQwen3Moe(c)
    n_params = sum(p.numel() for p in model.parameters())
    hf_check = check_against_hf(model)
    print(f"model: {n_params / 1e6:.2f} M parameters; {hf_check}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    T = args.seq_len
    t_train = time.time()
    log = []
    snapshots: list[dict] = []  # evaluated checkpoints of the last quarter: step, ppl, loops, weights

    def evaluate(step: int) -> None:
        nll, n = window_nll(model, held_ids, T)
        samples = probe_greedy(model, tok)
        loops = {p: max_ngram_repeats(ids, 4) for p, ids in samples.items()}
        sample = samples["The"]
        print(f"  eval step {step}: held-out ppl {math.exp(nll / n):.2f}; 4-gram repeats per probe {loops}; "
              f"greedy 'The': {tok.decode(sample)!r}", flush=True)
        if step >= args.steps * 3 // 4:
            snapshots.append({"step": step, "ppl": math.exp(nll / n), "loops": loops,
                              "looping": sum(r >= 3 for r in loops.values()),
                              "state": {k: v.detach().clone() for k, v in model.state_dict().items()}})

    for step in range(args.steps):
        starts = torch.randint(0, len(data) - T - 1, (args.batch,), generator=gen)
        batch = torch.stack([data[s:s + T + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits, aux = model(batch[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, c.vocab_size), batch[:, 1:].reshape(-1))
        loss = ce + args.aux_coef * aux
        if args.unlikelihood:
            ul = unlikelihood(logits, batch[:, :-1], batch[:, 1:])
            loss = loss + args.unlikelihood * ul
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append(ce.item())
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            evaluate(step + 1)
        if step % 20 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            recent = sum(log[-20:]) / len(log[-20:])
            ul_txt = f"  ul {ul.item():.3f}" if args.unlikelihood else ""
            print(f"step {step:4d}  loss {recent:.3f}  aux {aux.item():.3f}{ul_txt}  lr {lr_at(step):.2e}  "
                  f"{el:6.0f}s  {(step + 1) * args.batch * T / el:.0f} tok/s", flush=True)
    args.selected = args.steps
    if args.select and snapshots:
        best = min(snapshots, key=lambda s: (s["looping"], s["ppl"]))
        args.selected = best["step"]
        args.selection = [(s["step"], round(s["ppl"], 2), s["looping"]) for s in snapshots]
        model.load_state_dict(best["state"])
        print(f"selected the weights of step {best['step']} (looping probes, ppl per checkpoint: "
              f"{args.selection})", flush=True)
    train_seconds = time.time() - t_train
    final_loss = sum(log[-20:]) / len(log[-20:])
    nll, n = window_nll(model, held_ids, T)
    held_loss = nll / n
    print(f"held-out: loss {held_loss:.3f}, perplexity {math.exp(held_loss):.2f} over {n} tokens "
          f"(PyTorch, float32)", flush=True)

    # export
    vocab = Vocab.from_tokenizer(tok, bos=EOT, eos="<|im_end|>", pad=EOT, pre="qwen2", chat_template=CHATML_TEMPLATE)
    export_qwen3moe(args.out, model.state_dict(), c.hf_dict(), vocab, name="moeserve-tiny-moe",
                    context_length=T, metadata={"general.license": "PSF-2.0",
                                                "general.description": "Tiny Qwen3-MoE trained on Python's own "
                                                                       "documentation by scripts/train_tiny_moe.py"})
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)", flush=True)

    # the engine must tokenize exactly as training did
    from moeserve.tokenizer import Tokenizer

    ours = Tokenizer.from_gguf(args.out)
    probe = held_text[:20000]
    assert ours.encode(probe, add_special_tokens=False) == tok.encode(probe, add_special_tokens=False).ids, \
        "moeserve's tokenizer disagrees with the training tokenizer"

    if args.no_card:
        return
    out_dir = args.out.parent  # the model card, held-out text and licence go next to the model
    heldout_path = out_dir / "tiny-moe-heldout.txt"
    heldout_path.write_text(held_text, encoding="utf-8")
    copy_licence(out_dir)
    bench = _perplexity_bench(args.out, heldout_path, T)
    samples = _samples(args.out)
    _write_card(args, c, n_params, size, train_docs, held_docs, train_chars, len(stream), len(held_ids), final_loss,
                held_loss, n, bench, samples, train_seconds, time.time() - t_start, hf_check)


def copy_licence(out_dir: Path = DATA) -> None:
    """Ship CPython's LICENSE.txt (the PSF License Agreement the training text is under) with the model."""
    src = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if src.is_file():
        (out_dir / "LICENSE-PSF.txt").write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    else:
        print(f"note: {src} not found; add the PSF License Agreement to {out_dir} by hand", file=sys.stderr)


def _perplexity_bench(gguf: Path, text: Path, ctx: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "perplexity.py"), str(gguf), "--text", str(text),
           "--ctx", str(ctx), "--json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        print(f"perplexity benchmark failed: {exc}", file=sys.stderr)
        return {}


SAMPLE_PROMPTS = ("The for statement", "Return a list of", "class Queue", "Once upon a time")


def _samples(gguf: Path) -> list[tuple[str, str]]:
    """What `moeserve generate PROMPT -n 48 --seed 0` prints (the CLI's default sampling)."""
    from moeserve import LLM, SamplingParams

    llm = LLM(str(gguf))
    params = SamplingParams(max_tokens=48, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1,
                            seed=0)
    return [(p, llm.generate(p, params)[0].outputs[0].text) for p in SAMPLE_PROMPTS]


def _greedy_the(gguf: Path) -> tuple[str, int]:
    """`moeserve generate The -n 48 --temperature 0`: the text and its most repeated 4-gram's count."""
    from moeserve import LLM, SamplingParams

    out = LLM(str(gguf)).generate("The", SamplingParams(max_tokens=48, temperature=0.0))[0].outputs[0]
    return out.text, max_ngram_repeats(list(out.token_ids), 4)


def selection_md(args) -> str:
    """Which weights were exported, and why (the --select rule)."""
    if not getattr(args, "selection", None):
        return "The exported weights are those after the last step."
    rows = ", ".join(f"step {st}: ppl {ppl:.2f}, {lp} looping" for st, ppl, lp in args.selection)
    return (f"Exported: the weights of step {args.selected}, chosen among the checkpoints evaluated in the last "
            f"quarter by the fewest probes ({', '.join(repr(p) for p in PROBES)}) whose 48 greedy tokens repeat a "
            f"4-gram 3 times, then the lowest held-out perplexity ({rows}).")


def samples_md(samples: list[tuple[str, str]]) -> str:
    body = "\n\n".join(f"```\n$ moeserve generate {p!r} -n 48 --seed 0\n{t}\n```" for p, t in samples)
    return ("## Samples\n\nThe CLI's default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition "
            "penalty 1.1), seed 0:\n\n" + body + "\n")


def _write_card(args, c, n_params, size, train_docs, held_docs, train_chars, n_train_tokens, n_held_tokens,
                final_loss, held_loss, n_held_scored, bench, samples, train_seconds, total_seconds, hf_check):
    ms, lc = bench.get("moeserve"), bench.get("llama_cpp")
    greedy_text, greedy_rep = _greedy_the(args.out)
    fmt = lambda r: f"{r['perplexity']:.2f} (loss {r['loss']:.3f})" if r else "not measured"
    n_chat = sum(d.name.startswith("chat:") for d in train_docs)
    pydocs = [d for d in train_docs if d.name.startswith("pydocs:")]
    docs_line = (f"Python's documentation as Debian's `python3-doc` ships it ({len(pydocs)} reStructuredText sources: "
                 f"tutorial, library and language reference, HOWTOs, FAQ, What's New, C API; "
                 f"{sum(len(d.text) for d in pydocs) / 1e6:.2f} M characters as plain text), minus "
                 f"{getattr(args, 'docs_dropped', 0):,} paragraphs that share an 8-word sequence with the held-out "
                 "text, so the held-out set stays unseen. The tokenizer is trained on the docstring corpus alone "
                 "(the vocabulary of the first model).") if pydocs else "(no Python documentation: --python-docs '')"
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    moe = c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size + c.num_experts * c.hidden_size
    active = c.num_hidden_layers * (attn + moe) + c.vocab_size * c.hidden_size
    arch = (f"`qwen3moe` (QK-norm GQA attention, NEOX RoPE θ={c.rope_theta:g}, top-k routed SwiGLU experts, "
            "renormalised)")
    steps = f"{args.steps} steps of {args.batch}×{args.seq_len}"
    card = f"""# moeserve-tiny-moe

The default model of `moeserve`: a tiny Qwen3-MoE shipped inside the package (`moeserve-tiny-moe.gguf`),
so `moeserve generate "…"` works on a fresh install without downloading anything. It writes
Python-documentation-flavoured English; it is a demo and test fixture, not a useful assistant.

Reproduce with `apt install python3-doc; python scripts/train_tiny_moe.py` (2 CPU threads, seed {args.seed}).

## Licence

Weights and held-out text are derived from CPython's documentation and standard-library docstrings,
distributed under the **PSF-2.0** licence (Python Software Foundation License Version 2); the GGUF
records `general.license = PSF-2.0`. Copyright © 2001 Python Software Foundation; All Rights Reserved.
The licence text (CPython's `LICENSE.txt`, including the PSF License Agreement) is in `LICENSE-PSF.txt`.

## Training data

Text that ships with Python {platform.python_version()}:

* `pydoc_data.topics` — the Language Reference topics that `help()` shows;
* docstrings of the pure-Python standard library (module, class and function docstrings, each after
  its signature; `test`, `idlelib` tests, `lib2to3` and `turtledemo` skipped);
* the Zen of Python (`this`);
* {n_chat} ChatML question/answer pairs built from those docstrings ("What does `json.dumps` do?" →
  the docstring's first paragraph);
* {docs_line}

Documents of the first three kinds are split by a CRC32 of their name: 1 in 20 held out.
Train: {len(train_docs)} documents, {train_chars / 1e6:.2f} M characters, {n_train_tokens:,} tokens.
Held-out: {len(held_docs)} documents,
{n_held_tokens:,} tokens, in `tiny-moe-heldout.txt` (never seen by the tokenizer trainer or the model).

## Model

| | |
|---|---|
| architecture | {arch} |
| layers | {c.num_hidden_layers} |
| hidden size | {c.hidden_size} |
| attention heads / KV heads / head dim | {c.num_attention_heads} / {c.num_key_value_heads} / {c.head_dim} |
| experts / active per token / expert FFN | {c.num_experts} / {c.num_experts_per_tok} / {c.moe_intermediate_size} |
| vocabulary | {c.vocab_size} (byte-level BPE, `tokenizers`, `tokenizer.ggml.pre = qwen2`, ChatML specials) |
| embeddings | tied (no separate `output.weight`) |
| context length | {c.max_position_embeddings} (the training sequence length) |
| parameters | {n_params:,} total, ≈{active:,} active per token |
| file | {size / 1e6:.2f} MB: Q8_0 matrices, F32 norms and router |

Training module checked against transformers: {hf_check}.

## Training

AdamW (β=0.9/0.95, weight decay 0.1), lr {args.lr:g} with {max(1, args.steps // 20)} warm-up steps and cosine decay
to 10 %, gradient clipping 1.0, load-balancing loss ×{args.aux_coef:g},
token-level unlikelihood loss ×{args.unlikelihood:g} (Welleck et al. 2019: lowers the probability of context tokens
that are not next, against greedy loops); {steps}
tokens ({args.steps * args.batch * args.seq_len:,} tokens); {train_seconds / 60:.1f} min of training,
{total_seconds / 60:.1f} min in all, on {args.threads} shared CPU cores ({cpu_name()}, torch {torch.__version__}).
{selection_md(args)}

| | |
|---|---|
| final training loss (mean of last 20 steps) | {final_loss:.3f} |
| held-out loss / perplexity, PyTorch float32 | {held_loss:.3f} / {math.exp(held_loss):.2f} |
| held-out perplexity, moeserve (Q8_0 GGUF) | {fmt(ms)} |
| held-out perplexity, llama.cpp (same GGUF) | {fmt(lc)} |
| the first model (560 steps, docstrings only; same tokenizer and held-out text) | 132.84 moeserve, 132.82 llama.cpp |

Perplexity: non-overlapping windows of {args.seq_len} tokens over `tiny-moe-heldout.txt`, every token
but the first of each window scored ({n_held_scored:,} tokens); `benchmarks/perplexity.py` gives the
moeserve and llama.cpp numbers.

## Greedy

`moeserve generate The -n 48 --temperature 0` (the most frequent 4-gram occurs {greedy_rep}×):

```
The{greedy_text}
```

{samples_md(samples)}"""
    (args.out.parent / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    print(card)


if __name__ == "__main__":
    main()
