"""Hostile clients, first fixes: no 500 for an out-of-range seed, a non-streaming client that leaves early, or
a bad `serve` flag (issue: hostile files and hostile clients, item 7)."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from moeserve import LLM, SamplingParams
from moeserve.cli import app as cli_app
from moeserve.errors import RequestError
from moeserve.server.app import create_app
from moeserve.server.serving import until_disconnected


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1, 10**30])
def test_seed_outside_64_bits_is_a_clear_error(seed):
    with pytest.raises(RequestError, match="seed"):
        SamplingParams(seed=seed)


def test_seed_range_edges_work(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=64)
    for seed in (2**63 - 1, -(2**63)):
        out = llm.generate([[1, 2, 3]], SamplingParams(n=2, max_tokens=3, seed=seed, temperature=1.0))
        assert len(out[0].outputs) == 2
    with TestClient(create_app(llm, "tiny")) as client:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            for stream in (False, True):
                r = client.post(path, json={"model": "tiny", "max_tokens": 2, "seed": 2**70, "stream": stream, **body})
                assert r.status_code == 400 and "seed" in r.text, r.text


def test_a_client_that_leaves_early_gets_no_internal_error():
    class Gone:  # a request whose client has already disconnected
        async def receive(self):
            return {"type": "http.disconnect"}

    async def slow():
        await asyncio.sleep(10)
        return "never"

    async def main():
        return await until_disconnected(Gone(), slow())

    assert asyncio.run(main()) is None


@pytest.mark.parametrize("args, needle", [(["--log-level", "verbose"], "--log-level"),
                                          (["--kv-cache-memory", "abc"], "--kv-cache-memory")])
def test_bad_serve_flags_are_one_line_errors(args, needle):
    res = CliRunner().invoke(cli_app, ["serve", *args])
    assert res.exit_code != 0
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert needle in out and "internal error" not in out, out


def test_openai_error_objects_docs_behind_the_key_and_strict_numbers(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=64)
    with TestClient(create_app(llm, "tiny", api_key="k")) as client:
        for method, path, code in (("get", "/nope", 404), ("get", "/v1/completions", 405)):
            r = getattr(client, method)(path, headers={"Authorization": "Bearer k"})
            assert r.status_code == code and r.json()["error"]["message"], r.text
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404  # no open door beside the key
        r = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                        json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": True})
        assert r.status_code == 400 and "temperature" in r.json()["error"]["message"], r.text
        r = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                        json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", headers={"Authorization": "Bearer k", "content-type": "application/json"},
                        content=b"{not json")
        assert r.status_code == 400 and "error" in r.json(), r.text


def test_one_failing_request_does_not_abort_the_others(tiny_moe):
    """A request whose admission fails in the engine thread (here: a duplicate request id) gets the error;
    the request already running finishes normally."""
    from moeserve.engine.async_engine import AsyncLLMEngine

    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=64)
    engine = AsyncLLMEngine(llm.engine)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def main():
        good = engine.generate([1, 2, 3], params, request_id="same")
        seqs = llm.engine.make_sequences([4, 5], params)
        for s in seqs:
            s.request_id = "same"  # collides with the running request when the engine thread adds it
        bad = engine.add_sequences(seqs)
        tokens = []
        async for out in good:
            tokens += out.outputs[0].token_ids
        with pytest.raises(RequestError, match="already in use"):
            async for _ in bad:
                pass
        return tokens

    try:
        assert len(asyncio.run(main())) == 6
    finally:
        engine.shutdown()


def test_request_size_and_fan_out_limits(tiny_moe):
    llm = LLM(str(tiny_moe), kernels="reference", max_model_len=64)
    with TestClient(create_app(llm, "tiny")) as client:
        big = {"model": "tiny", "prompt": "x" * (9 * 1024 * 1024), "max_tokens": 1}
        r = client.post("/v1/completions", json=big)
        assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hi"] * 1000, "max_tokens": 1})
        assert r.status_code == 400 and "at most 64" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hi"] * 64, "n": 8, "max_tokens": 1})
        assert r.status_code == 400 and "sequences" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["hi"] * 4, "n": 2, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 8


@pytest.mark.parametrize("template, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x", "steps"),
    ("{% set s = 'x' * 10000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "steps"),
    ("{{ ('x' * 1000000000)|length }}", "exceeds the limit"),
    ("{{ range(10**9)|length }}", "Range too big"),
    ("{{ 2 ** 100000 }}", "exponent"),
    ("{% for i in range(20) %}{{ 'y' * 1000000 }}{% endfor %}", "characters"),
])
def test_hostile_chat_templates_are_bounded(template, needle):
    from moeserve.chat_template import ChatTemplate

    t0 = time.perf_counter()
    with pytest.raises(RequestError, match=needle):
        ChatTemplate(template, source="m.gguf").render([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - t0 < 3.0
    assert ChatTemplate(None).render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
