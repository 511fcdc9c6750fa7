"""Every validation error is one clear message naming the file, the tensor or key, expected and found."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType, GGUFWriter

from moeserve import LLM
from moeserve.errors import GGUFError, UnsupportedQuantError
from moeserve.testing import ModelSpec, rewrite_gguf, write_model

SMALL = dict(n_layers=1, hidden_size=64, head_dim=16, n_heads=4, n_kv_heads=2, n_experts=4, n_experts_used=2,
             expert_ffn=32, vocab_size=320)


def rewrite(src, dst, *, drop_key=None, set_kv=None, drop_tensor=None, replace_tensor=None):
    """Copy a GGUF, dropping or altering one key (set as a string) or tensor."""
    keys = {k: (v, GGUFValueType.STRING, None) for k, v in (set_kv or {}).items()}
    if drop_key:
        keys[drop_key] = None
    tensors = {drop_tensor: None} if drop_tensor else {}
    if replace_tensor:
        tensors[replace_tensor[0]] = (replace_tensor[1], replace_tensor[2])
    return rewrite_gguf(src, dst, keys=keys, tensors=tensors)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("bad") / "good.gguf", ModelSpec(**SMALL))


def expect(path, exc, *needles):
    with pytest.raises(exc) as info:
        LLM(str(path), warmup=False)
    msg = str(info.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg
    return msg


def test_good_file_loads(good):
    LLM(str(good), warmup=False)


def test_unknown_architecture(good, tmp_path):
    p = tmp_path / "arch.gguf"
    from gguf import GGUFReader

    r = GGUFReader(str(good))
    w = GGUFWriter(str(p), "mamba9")
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect(p, GGUFError, "unknown architecture", "mamba9", "qwen3moe")


def test_missing_key(good, tmp_path):
    expect(rewrite(good, tmp_path / "k.gguf", drop_key="qwen3moe.embedding_length"), GGUFError,
           "missing metadata key", "qwen3moe.embedding_length")


def test_wrong_key_type(good, tmp_path):
    p = rewrite(good, tmp_path / "t.gguf", set_kv={"qwen3moe.block_count": "two"})
    expect(p, GGUFError, "qwen3moe.block_count", "int", "str")


def test_missing_tensor(good, tmp_path):
    expect(rewrite(good, tmp_path / "m.gguf", drop_tensor="blk.0.ffn_up_exps.weight"), GGUFError,
           "missing tensor", "blk.0.ffn_up_exps.weight")


def test_router_out_features_not_expert_count(good, tmp_path):
    bad = np.zeros((3, 64), dtype=np.float32)  # 3 router rows, expert_count = 4
    p = rewrite(good, tmp_path / "r.gguf", replace_tensor=("blk.0.ffn_gate_inp.weight", bad, QT.F32))
    expect(p, GGUFError, "blk.0.ffn_gate_inp.weight", "[3, 64]", "expected [4, 64]")


def test_unsupported_quant_type(good, tmp_path):
    raw = np.zeros((256, 110), dtype=np.uint8)  # IQ3_S: 110 bytes per 256 weights; attn_q is [256, 256]
    p = write_model(tmp_path / "iq3.gguf", ModelSpec(**{**SMALL, "hidden_size": 256, "head_dim": 64}),
                    qtypes={"blk.0.attn_q.weight": QT.Q8_0})
    p2 = rewrite(p, tmp_path / "iq3_bad.gguf", replace_tensor=("blk.0.attn_q.weight", raw, QT.IQ3_S))
    msg = expect(p2, UnsupportedQuantError, "blk.0.attn_q.weight", "IQ3_S")
    assert "supported" in msg


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    for cut in (len(data) // 2, 40):
        p = tmp_path / f"trunc{cut}.gguf"
        p.write_bytes(data[:cut])
        expect(p, GGUFError, "truncated")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a model" * 10)
    expect(p, GGUFError, "not a GGUF file")


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        LLM(str(tmp_path / "nope.gguf"), warmup=False)


def test_cli_style_message_has_no_traceback_source(good, tmp_path):
    """The errors are raised from moeserve, not re-raised numpy/torch internals."""
    p = rewrite(good, tmp_path / "m2.gguf", drop_tensor="output_norm.weight")
    with pytest.raises(GGUFError) as info:
        LLM(str(p), warmup=False)
    assert info.value.__cause__ is None and info.value.__context__ is None
