"""/v1/embeddings and `moeserve.engine.embeddings`: pooled final-norm hidden states, L2-normalised."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from moeserve.engine.embeddings import embed
from tests.openai_server import MODEL, model_path, shared_server

HIDDEN = 256  # ModelSpec's default hidden_size


def test_server_embeddings() -> None:
    c = shared_server().client()
    texts = ["The quick brown fox", "jumps over", "the lazy dog", "x"]
    batch = c.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in batch.data] == [0, 1, 2, 3] and batch.model == MODEL
    vecs = np.array([d.embedding for d in batch.data])
    assert vecs.shape == (4, HIDDEN) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    singles = np.array([c.embeddings.create(model=MODEL, input=t, encoding_format="float").data[0].embedding
                        for t in texts])
    assert np.array_equal(vecs, singles)  # one forward per input: batch-mates change nothing
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > 4
    # base64 (the client's default) decodes to the same floats; token ids embed like their text
    b64 = c.embeddings.create(model=MODEL, input=texts)
    assert np.array_equal(np.array([d.embedding for d in b64.data], dtype=np.float32), vecs.astype(np.float32))
    from moeserve.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(model_path()).encode(texts[0])
    by_ids = c.embeddings.create(model=MODEL, input=[ids], encoding_format="float")
    assert np.array_equal(by_ids.data[0].embedding, vecs[0])
    assert by_ids.usage.prompt_tokens == len(ids)
    mean = c.embeddings.create(model=MODEL, input=texts[:2], encoding_format="float", extra_body={"pooling": "mean"})
    assert not np.allclose(mean.data[0].embedding, vecs[0])
    raw = c.embeddings.create(model=MODEL, input="x", encoding_format="float", extra_body={"normalize": False})
    assert not np.isclose(np.linalg.norm(raw.data[0].embedding), 1.0)
    assert np.allclose(raw.data[0].embedding / np.linalg.norm(raw.data[0].embedding), vecs[3], atol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"input": ""}, "input[0]"),
    ({"input": []}, "input"),
    ({"input": "ab " * 1500}, "2048"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "extra_body": {"truncate_prompt_tokens": 4}}, "truncate_prompt_tokens"),
])
def test_embedding_errors_are_400(kwargs: dict, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        shared_server().client().embeddings.create(**{"model": MODEL, **kwargs})
    assert err.value.status_code == 400 and needle in err.value.message


def test_embedding_unknown_model_is_404() -> None:
    with pytest.raises(openai.NotFoundError) as err:
        shared_server().client().embeddings.create(model="other", input="x")
    assert "other" in err.value.message


def test_python_api_last_token_is_the_lm_head_input() -> None:
    """The last-token vector (unnormalised) is exactly what the lm_head turns into the last logits."""
    from moeserve.engine.llm import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(str(model_path()), max_model_len=2048, warmup=False)
        out = embed(llm, ["hello there", [5, 6, 7]], normalize=False)
        assert out.embeddings.shape == (2, HIDDEN) and out.num_tokens[1] == 3
        ids = llm.tokenizer.encode("hello there")
        logits = llm.logits(ids)[-1]
        head = llm.model.lm_head(torch.from_numpy(out.embeddings[:1])).float().numpy()[0]
        assert np.allclose(head, logits, atol=1e-4, rtol=1e-4)
        unit = embed(llm, "hello there", pooling="mean").embeddings[0]
        assert np.isclose(np.linalg.norm(unit), 1.0, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
