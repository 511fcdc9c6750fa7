"""The OpenAI-compatible HTTP server: `create_app` (for tests and embedding) and `run` (for the CLI).

    app = create_app(LLM("model.gguf"), "my-model", api_key="secret")
    run("model.gguf", host="127.0.0.1", port=8000, max_num_seqs=16)

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming via SSE, ending with
`data: [DONE]`), /v1/embeddings, /health (engine and KV-pool state as JSON) and /metrics (Prometheus).
Every error is OpenAI-shaped JSON: 400 for invalid requests (bad types, out-of-range values,
unknown model, prompt longer than the context), 401 for a missing or wrong API key when one is
configured. /health and /metrics stay open so probes and scrapers need no key.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.engine.async_engine import AsyncLLMEngine
from moeserve.engine.engine import LLMEngine
from moeserve.engine.llm import LLM
from moeserve.errors import MoeServeError, RequestError
from moeserve.server.metrics import ServerMetrics
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from moeserve.server.serving import OpenAIServing, error_body

log = logging.getLogger("moeserve.server")
_ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                        "/v1/embeddings"})


MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted (413 beyond): a prompt of this many bytes is already ~2M tokens."""


class _LimitBody:
    """Pure ASGI middleware: a body larger than `limit` bytes is refused with 413 before it is read whole
    (Content-Length is checked up front; a chunked body is counted as it arrives)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body(f"request body is larger than {self.limit} bytes", 413)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class _CountRequests:
    """Pure ASGI middleware counting requests by endpoint and status (no buffering of streams)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")  # unknown paths share one label: scanners must not grow the registry
            self.metrics.http_requests.labels(path if path in _ENDPOINTS else "other", str(status["code"])).inc()


def _as_engine(target: LLM | LLMEngine | AsyncLLMEngine) -> AsyncLLMEngine:
    if isinstance(target, AsyncLLMEngine):
        return target
    if isinstance(target, LLM):
        target = target.engine
    if isinstance(target, LLMEngine):
        return AsyncLLMEngine(target)
    raise TypeError(f"create_app needs an LLM, LLMEngine or AsyncLLMEngine, got {type(target).__name__}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's error list: which field, what was wrong."""
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    field = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return f"invalid value for {field or 'request body'}: {e.get('msg', 'invalid')}", field


def create_app(llm_or_engine: LLM | LLMEngine | AsyncLLMEngine, served_model_name: str,
               api_key: str | None = None) -> FastAPI:
    """Build the FastAPI app around a model or engine. The engine thread runs while the app is up."""
    engine = _as_engine(llm_or_engine)
    metrics = ServerMetrics(engine, served_model_name)
    if engine.observer is None:
        engine.observer = metrics
    serving = OpenAIServing(engine, served_model_name)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise _Unauthorized()

    # With an API key the interactive docs and the schema would be an open door: they are off then.
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="moeserve", lifespan=lifespan, **docs)
    app.add_middleware(_LimitBody)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.state.engine, app.state.metrics, app.state.served_model_name = engine, metrics, served_model_name
    v1 = [Depends(check_key)]

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, field = _validation_message(exc)
        return JSONResponse(error_body(msg, param=field), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405, 413, ...
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), exc.status_code, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(MoeServeError)
    async def _engine_error(_: Request, exc: MoeServeError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), 500, "server_error"), status_code=500)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %r", exc)
        return JSONResponse(error_body(f"internal error: {exc}", 500, "server_error"), status_code=500)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(error_body("Invalid or missing API key; send 'Authorization: Bearer <key>'.", 401,
                                       "invalid_request_error", err_code="invalid_api_key"), status_code=401)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = engine.stats()
        p = s.pool
        return {"status": "ok", "model": served_model_name, "max_model_len": engine.max_model_len,
                "requests_waiting": s.waiting_requests, "requests_running": s.running_requests,
                "seqs_running": s.running_seqs, "kv_blocks_total": p.num_blocks, "kv_blocks_used": p.used_blocks,
                "kv_blocks_free": p.free_blocks, "kv_blocks_cached": p.cached_blocks,
                "prefix_cache_queries": p.prefix_queries, "prefix_cache_hits": p.prefix_hits,
                "preemptions": s.preemptions}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": started,
                                            "owned_by": "moeserve", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await serving.completions(req, raw)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        return await serving.chat(req, raw)

    @app.post("/v1/embeddings", dependencies=v1)
    async def create_embeddings(req: EmbeddingRequest, raw: Request) -> Any:
        return await serving.embeddings(req, raw)

    return app


class _Unauthorized(Exception):
    pass


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate `LLM(...)` arguments from uvicorn ones (everything else is rejected by name)."""
    llm_params = set(inspect.signature(LLM.__init__).parameters) - {"self", "model"}
    llm_kw = {k: v for k, v in kwargs.items() if k in llm_params}
    rest = {k: v for k, v in kwargs.items() if k not in llm_params}
    return llm_kw, rest


def run(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        served_model_name: str | None = None, log_level: str = "info", **engine_kwargs: Any) -> None:
    """Load the model and serve it until interrupted (what `moeserve serve` calls).

    `engine_kwargs` are `LLM(...)` arguments: max_model_len, kernels, num_kv_blocks,
    kv_cache_memory, kv_cache_dtype, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, ...
    """
    import uvicorn

    llm_kw, rest = _split_kwargs(engine_kwargs)
    if rest:
        raise TypeError(f"unknown server/engine arguments: {', '.join(sorted(rest))}")
    llm = LLM(model_path, **llm_kw)
    name = served_model_name or os.path.splitext(os.path.basename(llm.path))[0]
    app = create_app(llm, name, api_key=api_key)
    log.info("serving %s as %r on http://%s:%d", llm.path, name, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
