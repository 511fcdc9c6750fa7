"""The cpu backend vs the reference backend on the core parity configurations (issue 4, item 1):
whole-model logits within 1e-2·max|logits| and top-1 agreement ≥ 0.98 over teacher-forced positions."""

from __future__ import annotations

import numpy as np
import pytest

from moeserve import LLM

from .test_parity_hf import CONFIGS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_matches_reference(make_model, name):
    path = make_model("parity-" + name, n_layers=2, vocab_size=384, **CONFIGS[name])
    tokens = np.random.default_rng(2).integers(0, 250, 64).tolist()
    ref = LLM(str(path), kernels="reference", warmup=False).logits(tokens)
    fast_llm = LLM(str(path), kernels="cpu", warmup=False)
    assert fast_llm.kernels == "cpu"
    fast = fast_llm.logits(tokens)
    err = np.abs(fast - ref).max() / np.abs(ref).max()
    top1 = (fast.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{name}: fast vs reference rel err {err:.2e}, top-1 {top1:.3f}")
    assert err <= 1e-2
    assert top1 >= 0.98
