"""The seed's equivalence test and the contiguous KV cache's contract (capacity, overflow, release)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.errors import KVCacheOverflowError, RequestError

STEPS = 64


@pytest.fixture(scope="module")
def llm(tiny_moe):
    return LLM(str(tiny_moe), kernels="reference")


def test_cached_greedy_equals_full_recompute(llm):
    """Greedy with the KV cache == greedy by full recompute, token for token, logits within 1e-4."""
    prompt = [5, 17, 99, 3, 250, 42, 7]
    seq = ("equivalence",)
    try:
        cached_logits = [llm._forward([(seq, prompt)])[0].numpy()]
        tokens = [int(cached_logits[-1].argmax())]
        for _ in range(STEPS - 1):
            cached_logits.append(llm._forward([(seq, tokens[-1:])])[0].numpy())
            tokens.append(int(cached_logits[-1].argmax()))
    finally:
        llm.kv.release(seq)

    ids = list(prompt)
    for step in range(STEPS):
        full = llm.logits(ids)[-1]
        rel = np.abs(full - cached_logits[step]).max() / np.abs(full).max()
        assert rel <= 1e-4, f"step {step}: relative logit error {rel:.2e}"
        assert int(full.argmax()) == tokens[step], f"step {step}"
        ids.append(tokens[step])

    out = llm.generate([prompt], SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == tokens


def test_default_capacity(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", warmup=False)
    assert llm.kv.capacity == min(llm.config.context_length, 4096) == 4096
    assert LLM(str(tiny_moe), kernels="reference", warmup=False, max_model_len=100).kv.capacity == 100


def test_overflow_names_sequence_and_leaves_cache_untouched(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=32)
    seq = "req-7"
    prompt = list(range(10, 30))
    llm._forward([(seq, prompt)])
    kv = llm.kv.get(seq)
    k_before, v_before = kv.k.clone(), kv.v.clone()
    with pytest.raises(KVCacheOverflowError) as info:
        llm._forward([(seq, list(range(13)))])
    msg = str(info.value)
    assert "'req-7'" in msg and "20" in msg and "32" in msg
    assert kv.length == 20
    # bit patterns, not values: the unwritten tail of torch.empty may hold NaNs (NaN != NaN)
    assert torch.equal(kv.k.view(torch.int32), k_before.view(torch.int32))
    assert torch.equal(kv.v.view(torch.int32), v_before.view(torch.int32))
    # the sequence goes on exactly as if the failed call never happened
    nxt = llm._forward([(seq, [77])])[0].numpy()
    ref = llm.logits(prompt + [77])[-1]
    assert np.abs(nxt - ref).max() <= 1e-4 * np.abs(ref).max()
    # a batch where only one sequence overflows writes nothing for either
    other = "req-8"
    with pytest.raises(KVCacheOverflowError, match="req-7"):
        llm._forward([(other, [1, 2, 3]), (seq, list(range(12)))])
    assert llm.kv.get(other).length == 0 and kv.length == 21


def test_generation_stops_at_capacity(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=24)
    out = llm.generate([list(range(20))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
    with pytest.raises(RequestError, match="maximum context length of 24"):
        llm.generate([list(range(30))], SamplingParams(max_tokens=1))


def test_release_reset_and_warmup(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=64)
    assert not llm.kv.seqs  # warm-up released its sequence
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=0.0))
    assert not llm.kv.seqs  # generate releases what it used
    llm._forward([("a", [1, 2, 3])])
    llm._forward([("b", [1, 2])])
    llm.kv.release("a")
    assert set(llm.kv.seqs) == {"b"}
    llm.kv.reset()
    assert not llm.kv.seqs
    assert llm.kv.get("c").length == 0  # recycled buffers start empty
