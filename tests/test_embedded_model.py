"""The embedded default model (moeserve/data): a first-time user's first impression.

A small Qwen3-MoE whose held-out perplexity stays below the first model's 132.8 (moeserve/data/MODEL_CARD.md has
the numbers; its greedy continuation of "The" is printed there too).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from moeserve import LLM, SamplingParams
from moeserve.engine.llm import default_model_path
from moeserve.gguf.config import load_config
from moeserve.gguf.reader import GGUFFile

HELD_OUT = Path(default_model_path()).parent / "tiny-moe-heldout.txt"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def test_it_is_a_small_qwen3_moe() -> None:
    f = GGUFFile(default_model_path())
    c = load_config(f)
    assert f.architecture == "qwen3moe" and c.n_experts >= 8
    assert Path(default_model_path()).stat().st_size <= 20 * 10**6


def test_held_out_perplexity(llm: LLM) -> None:
    ids = llm.tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"), add_special_tokens=False)
    ctx = llm.max_model_len
    total, n = 0.0, 0
    for s in range(0, len(ids), ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            continue
        x = llm.logits(w)[:-1].astype(np.float64)
        m = x.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
        total += float((logz - x[np.arange(len(w) - 1), w[1:]]).sum())
        n += len(w) - 1
    assert math.exp(total / n) < 132.8


def test_greedy_the_is_not_a_loop(llm: LLM) -> None:
    """`moeserve generate The -n 48 --temperature 0`: no 4-gram occurs 3 times in the 48 tokens."""
    from collections import Counter

    ids = llm.generate("The", SamplingParams(max_tokens=48, temperature=0.0))[0].outputs[0].token_ids
    grams = Counter(tuple(ids[i:i + 4]) for i in range(len(ids) - 3))
    gram, count = grams.most_common(1)[0]
    assert count < 3, f"{llm.tokenizer.decode(list(gram))!r} occurs {count} times in {llm.tokenizer.decode(ids)!r}"
