"""Tokenizer built from a GGUF file's metadata.

A GGUF carries no ``tokenizer.json``: the vocabulary, the BPE merges, the token types and the
special-token ids are stored as ``tokenizer.*`` metadata keys under llama.cpp's names. This module
turns those keys into a Hugging Face ``tokenizers`` pipeline (Rust BPE, no hand-written merging),
configured the way llama.cpp configures its own tokenizer for the same file, so that a prompt
becomes the same token ids in moeserve as in llama-server (and as with the model's original
``tokenizer.json``, which llama.cpp's pre-tokenizer table mirrors):

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The text is split by the pre-tokenizer
  regexes that ``tokenizer.ggml.pre`` names (the table below is copied from llama.cpp's
  ``llama-vocab.cpp``), each piece is mapped to the GPT-2 byte alphabet and merged by rank.
* Tokens typed *control* (3) or *unknown* (2) become special added tokens and tokens typed
  *user-defined* (4) become plain added tokens, so ``<|im_start|>`` written in a prompt is that one
  token, as in llama-server (``parse_special=true``) and HF. ``encode(..., parse_special=False)``
  keeps control tokens as text but still matches user-defined ones, exactly like llama.cpp.
* Decoding goes through a per-token bytes table rather than ``tokenizers``' decoder, because
  generation is streamed token by token and a token may end in the middle of a UTF-8 sequence;
  :class:`StreamDecoder` builds on the same table.

Other tokenizer models (SentencePiece ``llama``, ``t5``, ``bert``, ...) raise :class:`GGUFError`.
"""

from __future__ import annotations

import codecs
import functools
import logging
import operator
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from moeserve.errors import GGUFError, RequestError

logger = logging.getLogger(__name__)

__all__ = ["PRE_TOKENIZERS", "PreTokenizerSpec", "StreamDecoder", "Tokenizer", "bytes_to_unicode"]

# GGUF token types (gguf.TokenType / llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# Token texts llama.cpp treats as end-of-generation whatever the metadata says (llama-vocab.cpp,
# "maintain a list of tokens that cause end-of-generation"); converters often only record one
# of them as eos, e.g. Qwen2 marks <|im_end|> but a base model ends with <|endoftext|>.
_LONG_TEXT = 4096  # characters above which encoding goes through encode_batch (GIL released)
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's <｜end▁of▁sentence｜>
        "[e~[",
    }
)
# Fill-in-the-middle pad / repo / file-separator tokens, which llama.cpp also ends generation on.
# (metadata key suffix, texts recognised when the key is absent)
_FIM_EOG = (
    ("fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")),
    ("fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")),
    ("fim_sep_token_id", ("<|file_sep|>",)),
)

# --------------------------------------------------------------------------------------------
# Pre-tokenizer regexes.
#
# llama.cpp applies a *list* of regexes in sequence: each one splits every piece the previous one
# produced, keeping both matches and the text between them. That is exactly a
# ``pre_tokenizers.Sequence`` of ``Split(..., behavior="isolated")``. Where llama.cpp rewrote a
# regex for std::regex (``(?i:...)`` spelled as ``[sS]``..., possessive quantifiers dropped) the
# original from the model's tokenizer.json is used instead: ``tokenizers`` runs Oniguruma, which
# supports it, and the original is what the vocabulary was trained with.
# --------------------------------------------------------------------------------------------

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILINGMOE = (
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_EXAONE_MOE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM = (
    r"[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _CJK_HANGUL,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}")


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one ``tokenizer.ggml.pre`` family.

    ``regexes`` are applied in order, each splitting the pieces of the previous one.
    ``ignore_merges``: a pre-token that is itself in the vocabulary is emitted whole without running
    the merges (Llama-3 / tekken tokenizers were trained that way; it changes a few ids).
    ``add_bos``: llama.cpp's default for ``tokenizer.ggml.add_bos_token`` when the key is absent.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_SPEC_GPT2 = PreTokenizerSpec((_GPT2,))
_SPEC_STARCODER = PreTokenizerSpec((r"\p{N}", _GPT2))  # digits one by one, then gpt2
_SPEC_LLAMA3 = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
_SPEC_LLAMA3_PLAIN = PreTokenizerSpec((_LLAMA3,))
_SPEC_QWEN2 = PreTokenizerSpec((_QWEN2,))
_SPEC_DEEPSEEK_V3 = PreTokenizerSpec(_DEEPSEEK_V3)
_SPEC_GPT4O = PreTokenizerSpec((_GPT4O,))
_SPEC_BAILINGMOE = PreTokenizerSpec((_BAILINGMOE,))

#: ``tokenizer.ggml.pre`` value -> pre-tokenizer, mirroring llama.cpp's ``llama_vocab::impl::load``.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    # llama.cpp's fallback for files converted before tokenizer.ggml.pre existed.
    "default": PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2".split(), _SPEC_LLAMA3),
    **dict.fromkeys("dbrx smaug-bpe glm4 chatglm-bpe".split(), _SPEC_LLAMA3_PLAIN),
    "tekken": PreTokenizerSpec((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(
        "qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2".split(), _SPEC_QWEN2
    ),
    "qwen35": PreTokenizerSpec((_QWEN35,)),
    # "gpt2" is not a value llama.cpp's converter writes ("gpt-2" is); accepted as an alias.
    **dict.fromkeys(
        (
            "gpt-2 gpt2 phi-2 mpt olmo jais trillion granite-docling exaone4 jina-es jina-de jina-v2-es "
            "jina-v2-de jina-v1-en jina-v2-code roberta-bpe gigachat a.x-4.0 mellum modern-bert"
        ).split(),
        _SPEC_GPT2,
    ),
    **dict.fromkeys("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2".split(), _SPEC_STARCODER),
    "falcon": PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "deepseek-llm": PreTokenizerSpec(_DEEPSEEK_LLM),
    "deepseek-coder": PreTokenizerSpec(_DEEPSEEK_CODER),
    **dict.fromkeys("deepseek-v3 hunyuan-dense joyai-llm hy_v4".split(), _SPEC_DEEPSEEK_V3),
    **dict.fromkeys("gpt-4o llama4 kanana2 talkie minimax-m2".split(), _SPEC_GPT4O),
    **dict.fromkeys("bailingmoe bailingmoe2 llada-moe".split(), _SPEC_BAILINGMOE),
    "seed-coder": PreTokenizerSpec((_SEED_CODER,)),
    "exaone-moe": PreTokenizerSpec((_EXAONE_MOE,)),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies.

    Printable Latin-1 bytes map to themselves, the rest to code points from U+0100 up, so every
    token is a printable string (space becomes ``Ġ``, newline ``Ċ``).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_DECODER: dict[str, int] = {ch: b for b, ch in bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    """The raw bytes a byte-level token stands for; the UTF-8 of the text if it is not byte-level."""
    try:
        return bytes(_BYTE_DECODER[ch] for ch in token)
    except KeyError:
        return token.encode("utf-8")


def _get(meta: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str, default: Any = None) -> Any:
    """Fetch a metadata key, checking its Python type so a corrupt file fails with a named key."""
    if key not in meta or meta[key] is None:
        return default
    value = meta[key]
    if kind is list and not isinstance(value, list) and (isinstance(value, tuple) or hasattr(value, "tolist")):
        value = list(value) if isinstance(value, tuple) else value.tolist()  # tuples, numpy arrays
    # bool is an int subclass; an id stored as bool is as wrong as one stored as a string.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GGUFError(f"{source}: metadata key {key!r} should be {kind}, found {type(value).__name__} {value!r:.80}")
    return value


class Tokenizer:
    """Text <-> token ids for one GGUF model.

    Build with :meth:`from_gguf` or :meth:`from_metadata`; the constructor is internal.
    Instances are immutable after construction and safe to share between threads.
    """

    def __init__(
        self,
        *,
        hf: HFTokenizer,
        tokens: list[str],
        token_types: list[int],
        token_bytes: list[bytes],
        special_ids: frozenset[int],
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None,
        unk_token_id: int | None,
        eos_token_ids: frozenset[int],
        add_bos: bool,
        add_eos: bool,
        model: str,
        pre: str,
        chat_template: str | None,
        source: str,
    ) -> None:
        self._hf = hf
        self._hf_no_special: HFTokenizer | None = None
        self._lock = threading.Lock()
        self._tokens = tokens
        self._token_types = token_types
        self._token_bytes = token_bytes
        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        self._special_ids = special_ids
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        #: Every id that ends generation: eos, eot/eom and llama.cpp's end-of-turn token texts.
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        #: ``tokenizer.ggml.model`` and ``tokenizer.ggml.pre`` as found in the file.
        self.model = model
        self.pre = pre
        #: ``tokenizer.chat_template`` (Jinja source) or None when the file has none.
        self.chat_template = chat_template
        self.source = source

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read the ``tokenizer.*`` keys of a GGUF file and build the tokenizer.

        Only metadata is read (the reader memory-maps the file; tensor data is not touched).
        """
        from moeserve.gguf.reader import PlainArrayReader  # imported lazily: only needed for this convenience path

        source = os.fspath(path)
        meta: dict[str, Any] = {}
        try:
            reader = PlainArrayReader(source, "r")
            for name, field in reader.fields.items():
                if name.startswith("tokenizer.") or name == "general.architecture":
                    meta[name] = field.contents()
        except FileNotFoundError as exc:
            raise GGUFError(f"{source}: no such file") from exc
        except Exception as exc:  # GGUFReader raises ValueError/struct.error/IndexError... on bad files
            raise GGUFError(f"{source}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
        return cls.from_metadata(meta, source=source)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "<gguf>") -> Tokenizer:
        """Build the tokenizer from GGUF metadata given as plain Python values.

        ``meta`` maps GGUF keys to values (``"tokenizer.ggml.tokens"`` -> ``list[str]``,
        ``"tokenizer.ggml.bos_token_id"`` -> ``int``, ...). ``source`` names the file in errors.

        An unknown ``tokenizer.ggml.pre`` does not fail: it falls back to the GPT-2 regex with a
        logged warning, because the vocabulary still works and most byte-level tokenizers differ
        from GPT-2 only in how digits and whitespace runs are split (ids may then differ from the
        reference tokenizer for such text; llama.cpp refuses such files outright). A missing ``pre``
        uses llama.cpp's ``"default"`` regexes, as llama.cpp does for files converted before the key
        existed.
        """
        model = _get(meta, "tokenizer.ggml.model", str, source)
        if model is None:
            raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.model' is missing; the file has no tokenizer")
        if model != "gpt2":
            raise GGUFError(
                f"{source}: tokenizer.ggml.model = {model!r} is not supported "
                f"(only byte-level BPE, 'gpt2', is; e.g. 'llama' is SentencePiece)"
            )
        tokens = _get(meta, "tokenizer.ggml.tokens", list, source)
        if not tokens:
            raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.tokens' is missing or empty")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp does
        n_vocab = len(tokens)
        token_types = _get(meta, "tokenizer.ggml.token_type", list, source)
        if token_types is None:
            token_types = [TOKEN_TYPE_NORMAL] * n_vocab
        elif len(token_types) < n_vocab:
            raise GGUFError(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {n_vocab} tokens")
        token_types = [int(t) for t in token_types[:n_vocab]]
        merges_raw = _get(meta, "tokenizer.ggml.merges", list, source)
        if merges_raw is None:
            raise GGUFError(f"{source}: metadata key 'tokenizer.ggml.merges' is missing (required for gpt2 BPE)")

        pre = _get(meta, "tokenizer.ggml.pre", str, source)
        if pre is None:
            logger.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer", source)
            spec = PRE_TOKENIZERS["default"]
            pre = "default"
        elif pre in PRE_TOKENIZERS:
            spec = PRE_TOKENIZERS[pre]
        else:
            logger.warning(
                "%s: unknown tokenizer.ggml.pre %r; falling back to the GPT-2 pre-tokenizer regex "
                "(token ids may differ from the reference tokenizer)",
                source,
                pre,
            )
            spec = _SPEC_GPT2

        # Special ids. Out-of-range ids are ignored with a warning, as llama.cpp does.
        def special_id(name: str) -> int | None:
            value = _get(meta, f"tokenizer.ggml.{name}", int, source)
            if value is not None and not 0 <= value < n_vocab:
                logger.warning("%s: tokenizer.ggml.%s = %d is outside the vocabulary; ignored", source, name, value)
                return None
            return value

        bos_id = special_id("bos_token_id")
        eos_id = special_id("eos_token_id")
        eot_id = special_id("eot_token_id")
        eom_id = special_id("eom_token_id")
        pad_id = special_id("padding_token_id")
        unk_id = special_id("unknown_token_id")
        add_bos = _get(meta, "tokenizer.ggml.add_bos_token", bool, source, spec.add_bos)
        add_eos = _get(meta, "tokenizer.ggml.add_eos_token", bool, source, False)
        if add_bos and bos_id is None:
            raise GGUFError(f"{source}: tokenizer.ggml.add_bos_token is true but no valid tokenizer.ggml.bos_token_id")
        if add_eos and eos_id is None:
            raise GGUFError(f"{source}: tokenizer.ggml.add_eos_token is true but no valid tokenizer.ggml.eos_token_id")

        # End-of-generation ids, following llama.cpp: eos/eot/eom, the FIM pad/repo/separator
        # tokens and any token spelled like a known end-of-turn marker. llama.cpp also promotes
        # such tokens to control tokens when the file mislabels them, so they parse as one token.
        token_to_id = {t: i for i, t in enumerate(tokens)}
        eog = {i for i, t in enumerate(tokens) if t in _EOG_TEXTS}
        for key, texts in _FIM_EOG:
            fim_id = special_id(key)
            if fim_id is None:
                fim_id = next((token_to_id[t] for t in texts if t in token_to_id), None)
            if fim_id is not None:
                eog.add(fim_id)
        if all(t in token_to_id for t in ("<|return|>", "<|call|>")) or all(
            t in token_to_id for t in ("<|calls|>", "<|flush|>")
        ):
            eog.discard(token_to_id.get("<|end|>", -1))  # gpt-oss / solar-open: <|end|> ends a message only
        for i in eog:
            if token_types[i] != TOKEN_TYPE_CONTROL:
                token_types[i] = TOKEN_TYPE_CONTROL
        eog.update(i for i in (eos_id, eot_id, eom_id) if i is not None)

        hf = _build_bpe(tokens, token_types, merges_raw, spec, source)

        special_ids = frozenset(
            i for i, t in enumerate(token_types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_UNUSED)
        )
        token_bytes = [
            tok.encode("utf-8")
            if typ in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN)
            else _byte_level_bytes(tok)
            for tok, typ in zip(tokens, token_types)
        ]
        return cls(
            hf=hf,
            tokens=tokens,
            token_types=token_types,
            token_bytes=token_bytes,
            special_ids=special_ids,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            unk_token_id=unk_id,
            eos_token_ids=frozenset(eog),
            add_bos=add_bos,
            add_eos=add_eos,
            model=model,
            pre=pre,
            chat_template=_get(meta, "tokenizer.chat_template", str, source),
            source=source,
        )

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the GGUF vocabulary (ids are ``0 .. vocab_size-1``)."""
        return len(self._tokens)

    @property
    def bos_token(self) -> str | None:
        """Text of the BOS token (what chat templates see as ``bos_token``), or None."""
        return None if self.bos_token_id is None else self._tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        """Text of the EOS token (what chat templates see as ``eos_token``), or None."""
        return None if self.eos_token_id is None else self._tokens[self.eos_token_id]

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry for ``token_id`` as stored (byte-level spelling, e.g. ``'Ġthe'``)."""
        return self._tokens[self._index(token_id)]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry spelled as stored, or None if it is not in the vocabulary."""
        return self._token_to_id.get(token)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most text bytes one token stands for: a text of N bytes needs at least N / this many tokens."""
        return max((len(b) for b in self._token_bytes), default=1) or 1

    def token_to_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` contributes to decoded text (may be a partial UTF-8 sequence)."""
        return self._token_bytes[self._index(token_id)]

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (e.g. for ``encode_batch``); do not mutate it."""
        return self._hf

    def is_special(self, token_id: int) -> bool:
        """True for control/unknown/unused tokens: the ones ``skip_special_tokens`` drops."""
        return token_id in self._special_ids

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for ``text``.

        ``add_special_tokens`` prepends BOS when the model asks for it (``add_bos``) and appends EOS
        when ``add_eos``; pass False for text that already went through a chat template containing
        ``{{ bos_token }}`` (as ``transformers.apply_chat_template`` does). ``parse_special=False``
        tokenizes control-token text such as ``<|im_start|>`` as ordinary characters, for text
        that must not be able to inject conversation structure.
        """
        if not isinstance(text, str):
            raise RequestError(f"text to encode must be str, got {type(text).__name__}")
        hf = self._hf if parse_special else self._no_special_tokenizer()
        try:
            # encode_batch releases the GIL while Rust works; encode holds it, stalling the server's event loop
            # (seen: 7.6 s without a /health answer while an 8 MB prompt was tokenized in a worker thread).
            if len(text) > _LONG_TEXT:
                ids: list[int] = hf.encode_batch([text], add_special_tokens=False)[0].ids
            else:
                ids = hf.encode(text, add_special_tokens=False).ids
        except TypeError as exc:  # the str cannot cross into Rust: it holds lone surrogates (e.g. JSON "\ud800")
            raise RequestError("text to encode is not valid Unicode (it contains a lone surrogate)") from exc
        if add_special_tokens:
            if self.add_bos and self.bos_token_id is not None:
                ids.insert(0, self.bos_token_id)
            if self.add_eos and self.eos_token_id is not None:
                ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; invalid UTF-8 (e.g. a sequence cut off mid-character) becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Raw bytes for ``ids``, without UTF-8 validation (for byte-exact consumers)."""
        out = []
        for token_id in ids:
            i = self._index(token_id)
            if skip_special_tokens and i in self._special_ids:
                continue
            out.append(self._token_bytes[i])
        return b"".join(out)

    # ---------------------------------------------------------------- internals

    def _index(self, token_id: int) -> int:
        """Validate a token id (numpy/torch integer scalars accepted) and return it as an int."""
        try:
            i = operator.index(token_id)
        except TypeError:
            raise RequestError(f"token id must be an integer, got {type(token_id).__name__}") from None
        if not 0 <= i < len(self._tokens):
            raise RequestError(f"token id {i} is outside the vocabulary of {self.source} (size {len(self._tokens)})")
        return i

    def _no_special_tokenizer(self) -> HFTokenizer:
        """A copy of the HF tokenizer that treats special added tokens as plain text.

        ``encode_special_tokens`` is a mutable flag on the Rust object; flipping it on the shared
        instance would race with concurrent encodes, so a private copy is made on first use.
        """
        with self._lock:
            if self._hf_no_special is None:
                copy = HFTokenizer.from_str(self._hf.to_str())
                copy.encode_special_tokens = True
                self._hf_no_special = copy
            return self._hf_no_special

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, model={self.model!r}, pre={self.pre!r}, "
            f"vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
        )


def _build_bpe(
    tokens: Sequence[str], token_types: Sequence[int], merges_raw: Sequence[str], spec: PreTokenizerSpec, source: str
) -> HFTokenizer:
    """The ``tokenizers`` pipeline: Split regexes -> ByteLevel alphabet -> BPE, plus added tokens."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GGUFError(f"{source}: duplicate token {tok!r} in tokenizer.ggml.tokens (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    merges: list[tuple[str, str]] = []
    for rank, merge in enumerate(merges_raw):
        # Split at the first space after position 0, like llama.cpp (a token may itself be " ").
        pos = merge.find(" ", 1) if isinstance(merge, str) else -1
        if pos < 0:
            raise GGUFError(f"{source}: tokenizer.ggml.merges[{rank}] = {merge!r:.80} is not 'left right'")
        merges.append((merge[:pos], merge[pos + 1 :]))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False)
    except Exception as exc:  # tokenizers raises a bare Exception for e.g. a merge of unknown tokens
        raise GGUFError(f"{source}: tokenizer.ggml.merges is inconsistent with the vocabulary: {exc}") from exc
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()  # only for users of the raw HF object; decode() uses bytes
    special = [
        AddedToken(tok, special=True, normalized=False)
        for tok, typ in zip(tokens, token_types)
        if typ in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)
    ]
    user = [
        AddedToken(tok, special=False, normalized=False)
        for tok, typ in zip(tokens, token_types)
        if typ == TOKEN_TYPE_USER_DEFINED
    ]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)
    return hf


class StreamDecoder:
    """Incremental detokenizer for streamed generation.

    ``push(token_id)`` returns only text that is complete: a multi-byte character split over
    several tokens (emoji, CJK in byte-level vocabularies) is held back until its last byte arrives,
    so a client never sees a broken character. Bytes that can never become valid UTF-8 are
    emitted as U+FFFD as soon as that is certain. The concatenation of all ``push`` results plus
    ``flush()`` equals ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one generated token; return the newly completed text (possibly ``""``)."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self._tokenizer.token_to_bytes(token_id))

    def flush(self) -> str:
        """End of stream: return held-back bytes (an incomplete sequence becomes U+FFFD) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    @property
    def pending(self) -> bool:
        """True while bytes of an unfinished character are held back."""
        return bool(self._decoder.getstate()[0])
