"""Hostile GGUF files: lying counts, offsets and hyper-parameters end in one clear `GGUFError` naming the file
and the key or tensor, fast and without allocating from the lie (issue: hostile files and clients, item 1)."""

from __future__ import annotations

import resource
import struct
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

from moeserve import LLM
from moeserve.errors import GGUFError, MoeServeError
from moeserve.gguf.reader import GGUFFile
from moeserve.testing import ModelSpec, rewrite_gguf, write_model

SMALL = dict(n_layers=1, hidden_size=64, head_dim=16, n_heads=4, n_kv_heads=2, n_experts=4, n_experts_used=2,
             expert_ffn=32, vocab_size=320)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("hostile") / "good.gguf", ModelSpec(**SMALL))


def rewrite(src, dst, key: str, value: object, vtype: GGUFValueType):
    """Copy a GGUF with one metadata key set to a value of any type (added when absent)."""
    return rewrite_gguf(src, dst, keys={key: (value, vtype, None)})


def expect(path, *needles, seconds: float = 10.0):
    t0 = time.perf_counter()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(MoeServeError) as info:
        LLM(str(path), warmup=False, kernels="reference")
    assert time.perf_counter() - t0 < seconds
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 512 * 1024  # KiB: no allocation from a lie
    msg = str(info.value)
    assert isinstance(info.value, GGUFError) and str(path) in msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _header(n_tensors: int, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_array_count_past_the_file_is_refused_at_once(tmp_path):
    """gguf-py would loop past the end of the file for a count of 2^64 - 1 and grow without bound."""
    for itype in (4, 8):  # uint32 items, string items
        p = tmp_path / f"array{itype}.gguf"
        p.write_bytes(_header(0, 1) + _key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, itype, 2**64 - 1)
                      + b"\0" * 64)
        expect(p, "tokenizer.ggml.tokens", seconds=2)
    p = tmp_path / "strlen.gguf"
    p.write_bytes(_header(0, 1) + _key("general.name") + struct.pack("<IQ", 8, 2**63) + b"abc")
    expect(p, "general.name", seconds=2)


def test_header_counts_past_the_file_are_refused(tmp_path):
    for n_tensors, n_kv, word in ((2**64 - 1, 0, "tensors"), (0, 2**40, "metadata")):
        p = tmp_path / f"count-{word}.gguf"
        p.write_bytes(_header(n_tensors, n_kv) + b"\0" * 100)
        expect(p, word, seconds=2)


def _tensor_offset_field(path, name: str) -> int:
    """File offset of the u64 data offset in tensor `name`'s table entry."""
    r = GGUFReader(str(path))
    t = next(t for t in r.tensors if t.name == name)
    return int(t.field.offset) + 8 + len(name.encode()) + 4 + 8 * len(t.shape) + 4


@pytest.mark.parametrize("delta, needle", [(1, "alignment"), (2**64 - 2**20, "truncated")])
def test_misaligned_or_wrapping_tensor_offsets(good, tmp_path, delta, needle):
    data = bytearray(good.read_bytes())
    at = _tensor_offset_field(good, "blk.0.attn_q.weight")
    (off,) = struct.unpack_from("<Q", data, at)
    struct.pack_into("<Q", data, at, (off + delta) % 2**64)
    p = tmp_path / f"offset{delta}.gguf"
    p.write_bytes(bytes(data))
    expect(p, "blk.0.attn_q.weight", needle)


def test_zero_and_too_many_dimensions(good, tmp_path):
    data = bytearray(good.read_bytes())
    name = "blk.0.attn_norm.weight"
    r = GGUFReader(str(good))
    t = next(t for t in r.tensors if t.name == name)
    dims_at = int(t.field.offset) + 8 + len(name) + 4
    zero = bytearray(data)
    struct.pack_into("<Q", zero, dims_at, 0)
    (tmp_path / "zero.gguf").write_bytes(bytes(zero))
    expect(tmp_path / "zero.gguf", name, "zero dimension")
    many = bytearray(data)
    struct.pack_into("<I", many, dims_at - 4, 9)
    (tmp_path / "dims.gguf").write_bytes(bytes(many))
    expect(tmp_path / "dims.gguf", name, "dimensions")


@pytest.mark.parametrize("key, value, vtype, needle", [
    ("qwen3moe.context_length", -1, GGUFValueType.INT32, "context_length"),
    ("qwen3moe.context_length", 0, GGUFValueType.UINT32, "context_length"),
    ("qwen3moe.expert_used_count", True, GGUFValueType.BOOL, "expert_used_count"),
    ("qwen3moe.attention.key_length", 2**17, GGUFValueType.UINT32, "key_length"),
    ("qwen3moe.attention.value_length", 2**32 - 1, GGUFValueType.UINT32, "value_length"),
    ("qwen3moe.rope.dimension_count", 2**17, GGUFValueType.UINT32, "rope.dimension_count"),
    ("qwen3moe.attention.layer_norm_rms_epsilon", float("nan"), GGUFValueType.FLOAT32, "epsilon"),
    ("qwen3moe.rope.freq_base", -1.0, GGUFValueType.FLOAT32, "freq_base"),
    ("qwen3moe.attention.sliding_window", -5, GGUFValueType.INT32, "sliding_window"),
    ("general.alignment", 3, GGUFValueType.UINT32, "alignment"),
])
def test_lying_hyperparameters(good, tmp_path, key, value, vtype, needle):
    p = rewrite(good, tmp_path / "lie.gguf", key, value, vtype)
    expect(p, needle)


def test_wrongly_shaped_rope_freqs(tmp_path):
    path = write_model(tmp_path / "llama.gguf", ModelSpec(**{**SMALL, "arch": "llama", "n_experts": 0,
                                                             "n_experts_used": 0, "ffn": 64}))
    rewrite_gguf(path, tmp_path / "freqs.gguf", tensors={"rope_freqs.weight": (np.ones(3, dtype=np.float32), QT.F32)})
    expect(tmp_path / "freqs.gguf", "rope_freqs.weight", "shape")


def test_the_good_file_still_loads(good):
    assert GGUFFile(good).architecture == "qwen3moe"
    LLM(str(good), warmup=False, kernels="reference").logits([1, 2, 3])


def test_head_size_is_checked_against_the_tensors_before_rope_tables_are_built(good, tmp_path):
    """key_length = value_length = 2^17 once built 3.3 GB of RoPE tables before the clean error."""
    p = rewrite(good, tmp_path / "k.gguf", "qwen3moe.attention.key_length", 2**17, GGUFValueType.UINT32)
    p = rewrite(p, tmp_path / "kv.gguf", "qwen3moe.attention.value_length", 2**17, GGUFValueType.UINT32)
    expect(p, "blk.0.attn_q.weight", "shape")
