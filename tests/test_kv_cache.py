"""The seed's equivalence test (cached decode == full recompute) on every backend, and the context limits."""

from __future__ import annotations

import numpy as np
import pytest

from moeserve import LLM, SamplingParams
from moeserve.errors import RequestError

STEPS = 64


@pytest.mark.parametrize("kernels", ["reference", "cpu"])
def test_cached_greedy_equals_full_recompute(tiny_moe, kernels):
    """Greedy through the engine (paged KV cache, one runner step per token) == greedy by full recompute,
    token for token, logits within 1e-4."""
    llm = LLM(str(tiny_moe), kernels=kernels)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    engine = llm.engine
    real, seen = engine.runner.execute, []

    def recording(chunks, argmax=False):  # the logits, even where the engine asks only for the argmax
        logits = real(chunks)
        seen.append(logits[0].numpy().copy())
        return engine.runner.model.argmax(logits) if argmax else logits

    engine.runner.execute = recording
    out = llm.generate([prompt], SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
    tokens = out[0].outputs[0].token_ids
    assert len(tokens) == len(seen) == STEPS
    ids = list(prompt)
    for step in range(STEPS):
        full = llm.logits(ids)[-1]
        rel = np.abs(full - seen[step]).max() / np.abs(full).max()
        assert rel <= 1e-4, f"step {step}: relative logit error {rel:.2e}"
        assert int(full.argmax()) == tokens[step], f"step {step}"
        ids.append(tokens[step])


def test_default_capacity(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", warmup=False)
    assert llm.max_model_len == llm.engine.max_model_len == min(llm.config.context_length, 4096) == 4096
    assert LLM(str(tiny_moe), kernels="reference", warmup=False, max_model_len=100).engine.max_model_len == 100


def test_generation_stops_at_capacity(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=24)
    out = llm.generate([list(range(20))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
    with pytest.raises(RequestError, match="maximum context length of 24"):
        llm.generate([list(range(30))], SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="maximum context length of 24"):
        llm.logits(list(range(25)))


def test_warmup_and_generate_return_every_block(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=64)
    st = llm.engine.stats()
    assert st.pool.used_blocks == 0 and st.steps == 0 and st.generation_tokens == 0  # warm-up leaves no trace
    llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=0.0))
    assert llm.engine.stats().pool.used_blocks == 0 and not llm.engine.has_unfinished()
