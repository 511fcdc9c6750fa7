"""Structured output: grammars that constrain sampling, through llguidance.

    params = SamplingParams(guided_json={"type": "object", "properties": {"x": {"type": "integer"}}})
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}"))

A request names one constraint (vLLM's `StructuredOutputsParams`): a JSON schema, any JSON object, a
regular expression, a choice of strings, or a Lark/GBNF grammar. It is compiled to an llguidance
grammar when the request arrives (a bad schema or regex is a `RequestError` naming the field), and
each sequence of the request gets its own `Guide`: an `LLMatcher` over the model's vocabulary.

At every step the sampler asks the guides of the rows that have one for a token bitmask (one bit
per vocabulary entry, computed on the host in parallel by llguidance's executor), copies the packed
mask to the logits' device and sets every disallowed logit to -inf before any other transform — so
greedy and random sampling alike can only pick tokens that keep the output inside the grammar. The
sampled token advances the matcher; EOS is allowed only where the grammar may end, and the sequence
finishes ("stop") as soon as the grammar can take nothing more. A completion cut short by
`max_tokens` (or a stop string) can still be incomplete.

The vocabulary is handed to llguidance as the GGUF's token bytes (`Tokenizer.token_to_bytes`),
special tokens flagged (a grammar can never spell them out) and the tokenizer's end-of-generation
ids as EOS; the `LLTokenizer` built from it (~0.3 s for 50k tokens) is cached per tokenizer.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from moeserve.errors import RequestError

log = logging.getLogger("moeserve.guided")

#: JSON whitespace allowed between tokens unless the request says otherwise (vLLM's
#: `guided_whitespace_pattern`): any JSON whitespace, at most 16 characters at a time — enough for
#: indented output, and a model can never spend its whole budget on blanks.
DEFAULT_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,16}"


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # a declared dependency; only a broken install lacks it
        raise RequestError("structured output needs the llguidance package (pip install llguidance)") from exc
    return llguidance


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's class of the same name; exactly one field may be set).

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a regular
    expression (Rust `regex` syntax, whole output); choice: the output is one of these strings;
    grammar: a Lark grammar (llguidance dialect, which may embed `%json {...}`) or GBNF.
    whitespace_pattern: the regex for whitespace between JSON tokens (json / json_object only).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        if self.json_object:
            set_.append("json_object")
        if len(set_) != 1:
            raise RequestError("structured output needs exactly one of json, json_object, regex, choice, grammar; "
                               f"got {', '.join(set_) or 'none'}")
        self.kind = set_[0]
        self.compiled = compile_grammar(self)

    def __repr__(self) -> str:
        return f"StructuredOutputsParams({self.kind}={getattr(self, self.kind)!r:.200})"


GuidedDecodingParams = StructuredOutputsParams  # vLLM's earlier name


def compile_grammar(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for `spec`, validated without a tokenizer (RequestError names the field)."""
    llg = _llg()
    M = llg.LLMatcher
    kind = spec.kind
    ws = spec.whitespace_pattern
    if ws is not None and (not isinstance(ws, str) or kind not in ("json", "json_object")):
        raise RequestError("whitespace_pattern must be a string and applies to json / json_object only")
    options = {"whitespace_pattern": ws if ws is not None else DEFAULT_WHITESPACE}
    if kind == "json_object":
        grammar = M.grammar_from_json_schema({"type": "object"}, defaults=options)
    elif kind == "json":
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise RequestError(f"the JSON schema is not valid JSON: {exc}") from None
        if schema is True:  # accepts any JSON value
            schema = {}
        if schema is False:
            raise RequestError("the JSON schema `false` accepts no output")
        if not isinstance(schema, dict):
            raise RequestError(f"the JSON schema must be an object, got {type(schema).__name__}")
        try:
            grammar = M.grammar_from_json_schema(schema, defaults=options)
        except (ValueError, TypeError) as exc:
            raise RequestError(f"invalid JSON schema: {exc}") from None
    elif kind == "regex":
        if not isinstance(spec.regex, str):
            raise RequestError("the guided regex must be a string")
        grammar = M.grammar_from_regex(spec.regex)
    elif kind == "choice":
        choice = spec.choice
        if not isinstance(choice, (list, tuple)) or not choice or not all(isinstance(c, str) and c for c in choice):
            raise RequestError("the guided choice must be a non-empty list of non-empty strings")
        grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    else:
        if not isinstance(spec.grammar, str) or not spec.grammar.strip():
            raise RequestError("the guided grammar must be a non-empty string")
        try:
            grammar = llg.grammar_from("grammar", spec.grammar)
        except ValueError as exc:
            raise RequestError(f"invalid grammar: {exc}") from None
    err = M.validate_grammar(grammar)
    if err and not err.startswith("WARNING"):
        lines = [x.strip() for x in err.strip().splitlines() if x.strip() and not x.strip().startswith(("^", "|"))]
        raise RequestError(f"invalid {kind.replace('_', ' ')} constraint: {' '.join(lines[:4])[:500]}")
    return grammar


# ------------------------------------------------------------------------------------------------
# The vocabulary as llguidance sees it
# ------------------------------------------------------------------------------------------------

class _Vocab:
    """The `TokenizerWrapper` protocol over a moeserve Tokenizer: token bytes, specials, EOS, encode."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_to_bytes(i) for i in range(n)]
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]
        eos = sorted(tokenizer.eos_token_ids)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos[0]
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False, parse_special=False)


_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def ll_tokenizer(tokenizer: Any) -> Any:
    """The llguidance tokenizer for `tokenizer`, built once (about a second for a 150k vocabulary)."""
    with _lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None:
            if not tokenizer.eos_token_ids:
                raise RequestError("structured output needs a tokenizer with an end-of-sequence token")
            llg = _llg()
            cached = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab(tokenizer)), eos_token=sorted(tokenizer.eos_token_ids))
            _tokenizers[tokenizer] = cached
        return cached


# ------------------------------------------------------------------------------------------------
# Per-sequence state
# ------------------------------------------------------------------------------------------------

class Guide:
    """One sequence's grammar state over the model's `tokenizer`; the matcher is made on the first mask."""

    def __init__(self, spec: StructuredOutputsParams, tokenizer: Any) -> None:
        self.spec, self._tokenizer = spec, tokenizer
        self.matcher: Any = None

    def _bind(self) -> Any:
        if self.matcher is None:
            tok = self._tokenizer
            if tok is None:
                raise RequestError("structured output needs a tokenizer")
            self.matcher = _llg().LLMatcher(ll_tokenizer(tok), self.spec.compiled, log_level=0)
            if self.matcher.is_error():
                log.warning("grammar failed to build: %s", self.matcher.get_error()[:500])
        return self.matcher

    def accept(self, token: int) -> None:
        """Advance over a sampled token (a token the mask did not allow puts the matcher in error)."""
        m = self._bind()
        if not m.is_stopped() and not m.consume_token(token):
            log.warning("guided sequence sampled token %d outside its grammar: %s", token, m.get_error()[:500])

    @property
    def finished(self) -> bool:
        """True when the grammar can take nothing more (complete) or the matcher failed."""
        return self.matcher is not None and self.matcher.is_stopped()

    @property
    def failed(self) -> bool:
        return self.matcher is not None and self.matcher.is_error()


_executor: Any = None


def fill_bitmask(guides: list[Guide]) -> torch.Tensor:
    """int32 [len(guides), words] allowed-token bitmask (bit i of word j: token 32*j+i), on the host."""
    global _executor
    matchers = [g._bind() for g in guides]
    words = (ll_tokenizer(guides[0]._tokenizer).vocab_size + 31) // 32
    mask = torch.zeros(len(guides), words, dtype=torch.int32)
    live = [(m, i) for i, m in enumerate(matchers) if not m.is_error()]
    if live:
        with _lock:
            if _executor is None:
                _executor = _llg().LLExecutor()
        _executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), words * 4, len(guides))
    return mask


def apply_bitmask(logits: torch.Tensor, rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    """`logits` with every token not allowed by `mask` (packed, one row per entry of `rows`) at -inf.

    The packed mask (V/32 words a row) is what crosses to the logits' device; it is unpacked there.
    Columns past the mask (padding rows of a model's vocabulary) are disallowed. A row whose mask is
    empty (a failed matcher) is left free, so the sampler never sees an all -inf row; such a sequence is
    finished by the engine at its next token.
    """
    vocab = logits.shape[1]
    bits = mask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    allowed = allowed[:, :vocab] | ~allowed.any(dim=1, keepdim=True)
    idx = torch.tensor(rows, device=logits.device)
    out = logits.clone()
    out[idx] = logits[idx].masked_fill(~allowed, float("-inf"))
    return out
