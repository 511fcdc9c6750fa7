"""The OpenAI-compatible server, driven by the official `openai` client against real server processes.

Two servers run on a tiny random model: the main one (API key, prefix caching) and one with a
deliberately tiny KV pool and no prefix cache, which must preempt constantly yet produce exactly
the tokens the main server produces for each request alone.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from moeserve.testing import ModelSpec, write_model

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
MODEL = "tiny"


class Server:
    def __init__(self, model: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeserve.server", str(model), "--port", str(self.port), "--served-model-name",
             MODEL, "--max-model-len", "256", "--log-level", "warning", *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("server did not become ready")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("server") / "tiny.gguf", ModelSpec(context_length=256, seed=5))


@pytest.fixture(scope="module")
def servers(model: Path) -> Iterator[tuple[Server, Server]]:
    main = Server(model, "--api-key", KEY)
    tiny = Server(model, "--num-kv-blocks", "7", "--no-prefix-caching")
    try:
        main.wait_ready()
        tiny.wait_ready()
        yield main, tiny
    finally:
        main.stop()
        tiny.stop()


@pytest.fixture(scope="module")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def wait_idle(server: Server, timeout: float = 60.0) -> dict:
    """Poll /health until no request runs and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        h = server.health()
        if h["kv_blocks_used"] == 0 and h["requests_running"] == 0 and h["requests_waiting"] == 0:
            return h
        if time.monotonic() > deadline:
            raise AssertionError(f"server still busy: {h}")
        time.sleep(0.1)


def test_models_health_and_auth(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [MODEL]
    h = server.health()
    assert h["status"] == "ok" and h["max_model_len"] == 256 and h["kv_blocks_total"] > 0
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_completions_streaming_and_not(server: Server) -> None:
    c = server.client()
    full = c.completions.create(model=MODEL, prompt="Hello, world", max_tokens=10, **GREEDY)
    ch = full.choices[0]
    assert ch.finish_reason == "length" and full.usage.completion_tokens == 10
    assert full.usage.total_tokens == full.usage.prompt_tokens + 10
    chunks = list(c.completions.create(model=MODEL, prompt="Hello, world", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == ch.text
    assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    # logprobs, several prompts, n
    multi = c.completions.create(model=MODEL, prompt=["Hello, world", "abc"], max_tokens=3, n=2, logprobs=2,
                                 **GREEDY)
    assert [x.index for x in multi.choices] == [0, 1, 2, 3] and multi.choices[0].text == ch.text[:len(
        multi.choices[0].text)]
    lp = multi.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2 and "".join(lp.tokens) == multi.choices[0].text


def test_chat_streaming_and_not(server: Server) -> None:
    c = server.client()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3,
                                     **GREEDY)
    ch = full.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason == "length"
    assert len(ch.logprobs.content) == 8 and len(ch.logprobs.content[0].top_logprobs) == 3
    assert ch.logprobs.content[0].top_logprobs[0].logprob >= ch.logprobs.content[0].top_logprobs[1].logprob
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, stream=True, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(x.choices[0].delta.content or "" for x in chunks) == ch.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # seeded sampling is reproducible; n=2 gives two choices
    sampled = [c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=1.0, seed=7, n=2)
               for _ in range(2)]
    assert [x.message.content for x in sampled[0].choices] == [x.message.content for x in sampled[1].choices]


def test_stop_strings(server: Server) -> None:
    c = server.client()
    text = c.completions.create(model=MODEL, prompt="The stop test", max_tokens=24, **GREEDY).choices[0].text
    stop = text[8:11]
    assert stop and stop not in text[:8]
    res = c.completions.create(model=MODEL, prompt="The stop test", max_tokens=24, stop=[stop], **GREEDY)
    assert res.choices[0].text == text[:text.index(stop)] and res.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt="The stop test", max_tokens=24, stop=stop, stream=True,
                                    **GREEDY)
    assert "".join(x.choices[0].text for x in streamed) == res.choices[0].text


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"prompt": "ab " * 400}, "256"),
])
def test_invalid_requests_get_400(server: Server, kwargs: dict, needle: str) -> None:
    args = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        server.client().completions.create(**args)
    assert err.value.status_code == 400 and needle in err.value.message
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=[{"role": "user"}], max_tokens="x")


def test_unknown_model_gets_404(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        server.client().completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert err.value.status_code == 404 and "no-such-model" in err.value.message
    assert err.value.code == "model_not_found"


def test_disconnects_abort_and_free_blocks(server: Server) -> None:
    body = {"model": MODEL, "prompt": "A long story", "max_tokens": 200, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    break
        assert events == 3
    wait_idle(server)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up (200 tokens take > 50 ms)
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=0.05)
    wait_idle(server)
    metrics = httpx.get(server.url + "/metrics").text
    aborted = re.search(r'moeserve_request_finished_total\{finish_reason="abort",model_name="tiny"\} (\S+)', metrics)
    assert aborted and float(aborted.group(1)) >= 2
    res = server.client().completions.create(model=MODEL, prompt="still alive?", max_tokens=3)
    assert res.usage.completion_tokens == 3


def steps(server: Server) -> float:
    m = re.search(r"moeserve_engine_steps_total\{[^}]*\} (\S+)", httpx.get(server.url + "/metrics").text)
    return float(m.group(1))


def test_concurrent_greedy_requests_match_alone(server: Server) -> None:
    prompts = ["One fish", "Two fish and a much longer prompt than the first one", "Red", "Blue fish swims"]
    s0 = steps(server)
    alone = [server.client().completions.create(model=MODEL, prompt=p, max_tokens=24, **GREEDY).choices[0].text
             for p in prompts]
    s1 = steps(server)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(
            lambda p: server.client().completions.create(model=MODEL, prompt=p, max_tokens=24, **GREEDY)
            .choices[0].text, prompts))
    s2 = steps(server)
    assert together == alone
    assert s2 - s1 < 0.75 * (s1 - s0)  # they really shared steps
    wait_idle(server)


def test_preemption_under_a_tiny_pool_keeps_exact_tokens(servers: tuple[Server, Server]) -> None:
    main, tiny = servers
    prompts = ["The first prompt has some words", "A second, different prompt", "Third one here!",
               "and the fourth prompt of all"]

    def ask(srv: Server, p: str) -> str:
        return srv.client().completions.create(model=MODEL, prompt=p, max_tokens=60, **GREEDY).choices[0].text

    alone = [ask(main, p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: ask(tiny, p), prompts))
    assert together == alone
    h = wait_idle(tiny)
    assert h["preemptions"] > 0 and h["kv_blocks_total"] == 7


def test_prefix_cache_hits_give_identical_tokens(servers: tuple[Server, Server]) -> None:
    main, uncached = servers
    system = {"role": "system", "content": "You are a helpful assistant for the prefix cache test, number 42."}
    convs = [[system, {"role": "user", "content": q}] for q in ("What is up?", "Tell me more")]

    def ask(srv: Server, msgs: list) -> tuple[str, int]:
        r = srv.client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, **GREEDY)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    hits0 = main.health()["prefix_cache_hits"]
    first, cached0 = ask(main, convs[0])
    second, cached1 = ask(main, convs[1])
    assert cached0 == 0 and cached1 >= 32
    assert main.health()["prefix_cache_hits"] - hits0 == cached1
    assert [first, second] == [ask(uncached, c)[0] for c in convs]
    metrics = httpx.get(main.url + "/metrics").text
    for name in ("moeserve_kv_blocks_used", "moeserve_kv_blocks_free", "moeserve_num_requests_waiting",
                 "moeserve_num_seqs_running", "moeserve_prefix_cache_hits_total", "moeserve_generation_tokens_total",
                 "moeserve_time_to_first_token_seconds_count", "moeserve_inter_token_latency_seconds_count"):
        assert name in metrics


def test_async_engine_survives_a_failing_step(model: Path) -> None:
    """A step that raises fails the requests in flight (blocks freed) and the engine keeps serving."""
    import asyncio

    import torch

    from moeserve.engine.async_engine import AsyncLLMEngine
    from moeserve.engine.llm import LLM
    from moeserve.engine.sampling import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncLLMEngine(LLM(str(model), max_model_len=256, warmup=False).engine)
    real_step, calls = engine.engine.step, {"n": 0}

    def flaky_step():  # the third step blows up
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_step()

    engine.engine.step = flaky_step
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def collect(prompt: str) -> list[int]:
        return [t for out in [o async for o in engine.generate(prompt, params)] for c in out.outputs
                for t in c.token_ids]

    async def main() -> list[int]:
        with pytest.raises(RuntimeError, match="boom"):
            await collect("first")
        return await collect("second")

    try:
        assert len(asyncio.run(main())) == 8
        assert engine.stats().pool.used_blocks == 0 and not engine.engine.has_unfinished()
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
