"""What users of llama.cpp, Ollama and vLLM expect from the server: /health 503 while the model loads,
CORS, X-Request-Id, 404 for an unknown model, a per-request log line and a startup banner."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient

from moeserve import LLM
from moeserve.server.app import banner, create_app


@pytest.fixture(scope="module")
def llm(tiny_moe) -> LLM:
    return LLM(str(tiny_moe), kernels="reference", max_model_len=64)


def wait_for(client: TestClient, status: int, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/health")
        if r.status_code == status:
            return r
        time.sleep(0.05)
    raise AssertionError(f"/health never answered {status}")


def test_health_is_503_loading_until_the_model_is_loaded(llm):
    release = threading.Event()
    loaded = []

    def slow_loader() -> LLM:
        assert release.wait(30)
        return llm

    app = create_app(slow_loader, "tiny", on_ready=lambda target, engine: loaded.append(target))
    with TestClient(app) as client:  # the app is up while the loader still waits
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert client.get("/metrics").status_code == 200
        release.set()
        r = wait_for(client, 200)
        assert r.json()["status"] == "ok" and loaded == [llm]
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert "moeserve_kv_blocks_total" in client.get("/metrics").text


def test_a_failed_load_is_reported():
    errors = []

    def broken() -> LLM:
        raise ValueError("no such model")

    with TestClient(create_app(broken, "tiny", on_error=errors.append)) as client:
        wait_for(client, 503)
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["status"] == "error"
        assert len(errors) == 1 and "no such model" in str(errors[0])


def test_request_id_is_echoed_or_generated(llm):
    with TestClient(create_app(llm, "tiny", api_key="k")) as client:
        r = client.get("/health", headers={"X-Request-Id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
        assert len(ids) == 3 and all(len(i) >= 16 for i in ids)
        # errors carry it too: 401, 404 for a path, 400
        assert client.get("/v1/models", headers={"X-Request-Id": "e1"}).headers["x-request-id"] == "e1"
        assert client.get("/nope", headers={"X-Request-Id": "e2"}).headers["x-request-id"] == "e2"
        r = client.post("/v1/completions", headers={"Authorization": "Bearer k", "X-Request-Id": "e3"},
                        json={"model": "tiny", "prompt": "hi", "max_tokens": 0})
        assert r.status_code == 400 and r.headers["x-request-id"] == "e3"


def test_unknown_model_is_404_model_not_found(llm):
    with TestClient(create_app(llm, "tiny")) as client:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/embeddings", {"input": "hi"})):
            r = client.post(path, json={"model": "gpt-4", "max_tokens": 2, **body})
            assert r.status_code == 404, r.text
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model" and "gpt-4" in err["message"]


def test_cors_preflight_and_headers(llm):
    origin = "http://localhost:3000"
    with TestClient(create_app(llm, "tiny", api_key="k", allowed_origins=[origin])) as client:
        r = client.options("/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert r.status_code == 200, r.text  # no API key needed for a preflight
        assert r.headers["access-control-allow-origin"] == origin
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.get("/health", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        r = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"})
        assert r.status_code == 400
    with TestClient(create_app(llm, "tiny")) as client:  # off by default
        r = client.get("/health", headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers


def test_each_request_is_logged(llm, caplog):
    with TestClient(create_app(llm, "tiny")) as client, caplog.at_level(logging.INFO, logger="moeserve.server"):
        r = client.post("/v1/completions", headers={"X-Request-Id": "log-me"},
                        json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "stream": True})
        assert r.status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "moeserve.server"]
    mine = [x for x in lines if "log-me" in x]
    assert len(mine) == 1, lines
    assert "output 3 tokens" in mine[0] and "time to first token" in mine[0] and "tokens/s" in mine[0]
    assert "prompt " in mine[0] and "finish length" in mine[0]
    assert len([x for x in lines if x.startswith("request ")]) == 2, lines


def test_banner_names_model_arch_quants_context_pool_kernels_url(llm):
    text = banner(llm, "tiny", "http://127.0.0.1:8000")
    for needle in (llm.path, "qwen3moe", "F32", "64 tokens", "KV pool", "blocks", "reference", "cpu",
                   "http://127.0.0.1:8000/v1"):
        assert needle in text, (needle, text)
    assert "profiled" not in text  # a CPU pool has a fixed budget; a GPU's names the step reserve it measured
    llm.engine.step_reserve = 3 * 2**30
    try:
        assert "3.00 GiB kept free for a step's activations (profiled)" in banner(llm, "tiny", "http://x")
    finally:
        llm.engine.step_reserve = None
