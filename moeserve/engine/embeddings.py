"""Sentence embeddings from a decoder: pooled final hidden states (what /v1/embeddings serves).

    from moeserve.engine.embeddings import embed
    out = embed(llm, ["first text", "second text"])        # EmbeddingOutput
    out.embeddings.shape                                     # (2, hidden_size), float32, unit rows

Each input runs one full forward with no KV cache (`ModelRunner.hidden_full`, reentrant: safe beside
a serving engine), so an input's vector never depends on the other inputs of its batch. The hidden
states taken are the final norm's output (the lm_head's input). Pooling:

* ``"last"`` (default, as vLLM for decoder models): the last token's state — in a causal model the
  only position that has seen the whole input;
* ``"mean"``: the average over all the input's tokens.

The vector is then L2-normalised (``normalize=True``, the default), so cosine similarity is a dot
product. Text is tokenized as a completion prompt is (BOS added when the model asks for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moeserve.errors import RequestError

POOLINGS = ("last", "mean")


@dataclass
class EmbeddingOutput:
    embeddings: np.ndarray  # float32 [n_inputs, hidden_size]
    num_tokens: list[int]  # tokens of each input


def _inputs(inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[str | list[int]]:
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    if items and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        return [items]  # one input given as token ids
    return [x if isinstance(x, str) else list(x) for x in items]


def tokenize(target: Any, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Each input as validated token ids (RequestError for an empty or too long input)."""
    engine = getattr(target, "engine", target)
    items = _inputs(inputs)
    if not items:
        raise RequestError("input is empty")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str) and not item:
            raise RequestError(f"input[{i}] is an empty string")
        _, ids = engine.encode_prompt(item)
        out.append(engine.check_ids(ids, f"input[{i}]"))
    return out


def embed_ids(target: Any, token_ids: list[list[int]], pooling: str = "last", normalize: bool = True) -> np.ndarray:
    """float32 [len(token_ids), hidden]: the pooled (and normalised) final hidden states of each input."""
    if pooling not in POOLINGS:
        raise RequestError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    engine = getattr(target, "engine", target)
    rows = []
    for ids in token_ids:
        h = engine.runner.hidden_full(ids)
        v = h[-1] if pooling == "last" else h.mean(dim=0)
        if normalize:
            v = torch.nn.functional.normalize(v, dim=0)
        rows.append(v.float().cpu())
    return torch.stack(rows).numpy() if rows else np.zeros((0, engine.model.config.hidden_size), np.float32)


def embed(target: Any, inputs: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
          pooling: str = "last", normalize: bool = True) -> EmbeddingOutput:
    """Embed text or token-id inputs with an `LLM` or `LLMEngine` (see the module doc)."""
    ids = tokenize(target, inputs)
    return EmbeddingOutput(embed_ids(target, ids, pooling, normalize), [len(x) for x in ids])
