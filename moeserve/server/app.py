"""The OpenAI-compatible HTTP server: `create_app` (for tests and embedding) and `run` (for the CLI).

    app = create_app(LLM("model.gguf"), "my-model", api_key="secret")
    run("model.gguf", host="127.0.0.1", port=8000, max_num_seqs=16)

    app = create_app(lambda: LLM("model.gguf"), "my-model")  # loads in a thread once the app starts

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming via SSE, ending with
`data: [DONE]`), /v1/embeddings, /health (engine and KV-pool state as JSON) and /metrics (Prometheus).
Every error is OpenAI-shaped JSON: 400 for invalid requests (bad types, out-of-range values,
prompt longer than the context), 404 (code "model_not_found") for a `model` this server does not
serve, 401 for a missing or wrong API key when one is configured, 503 while the model is still
loading (`/health` then answers 503 {"status": "loading"}, 200 once it is ready). /health and
/metrics stay open so probes and scrapers need no key.

Every response carries `X-Request-Id` (the client's, or a generated one); `allowed_origins` turns
CORS on (preflight OPTIONS answered). Each finished generation request is logged at info level on
the "moeserve.server" logger: prompt and output tokens, time to first token, tokens/s.
"""

from __future__ import annotations

import hmac
import inspect
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moeserve.engine.async_engine import AsyncLLMEngine, RequestStream
from moeserve.engine.engine import LLMEngine
from moeserve.engine.llm import LLM
from moeserve.errors import MoeServeError, RequestError
from moeserve.server.metrics import ServerMetrics
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from moeserve.server.serving import OpenAIServing, error_body

Servable = LLM | LLMEngine | AsyncLLMEngine

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


_request_id: ContextVar[str | None] = ContextVar("moeserve_request_id", default=None)


class _RequestId:
    """Pure ASGI middleware: every response carries `X-Request-Id`, the client's (if sane) or a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1").strip()
        rid = given if given and len(given) <= 200 and given.isprintable() else uuid.uuid4().hex
        token = _request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


class _LoggedStream(RequestStream):
    """A RequestStream that logs one info line when it ends: tokens, time to first token, tokens/s."""

    http_id: str | None = None
    finish: str | None = None

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            async for out in super().__aiter__():
                self.finish = next((c.finish_reason for c in out.outputs if c.finish_reason), self.finish)
                yield out
        finally:
            if log.isEnabledFor(logging.INFO):
                end = time.monotonic()
                ttft = f"{(self._first - self.arrival) * 1000:.0f} ms" if self._first is not None else "-"
                decode = (self._last or end) - (self._first or end)
                rate = (self._generated - 1) / decode if decode > 0 and self._generated > 1 else 0.0
                log.info("request %s: prompt %d tokens, output %d tokens, time to first token %s, %.1f tokens/s, "
                         "%.2f s, finish %s", self.http_id or self.request_id, self.prompt_tokens, self._generated,
                         ttft, rate, end - self.arrival, self.finish or "aborted")


class _Serving(OpenAIServing):
    """OpenAIServing with a 404 for an unknown model and a log line per request."""

    def check_model(self, model: str | None) -> JSONResponse | None:
        if model is not None and model != self.model_name:
            return JSONResponse(error_body(f"The model `{model}` does not exist; this server serves "
                                           f"`{self.model_name}`.", 404, param="model", err_code="model_not_found"),
                                404)
        return None

    async def start(self, prompts: list[str | list[int]], params: Any) -> list[RequestStream]:
        streams = await super().start(prompts, params)
        http_id = _request_id.get()
        for i, st in enumerate(streams):
            if type(st) is RequestStream:  # same fields, one more behaviour: log when the stream ends
                st.__class__ = _LoggedStream
                st.http_id = http_id if len(streams) == 1 or http_id is None else f"{http_id}/{i}"
        return streams


def _as_engine(target: Servable) -> AsyncLLMEngine:
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


class _Model:
    """What the app serves: filled at once (a model was given) or by a loader thread when the app starts."""

    def __init__(self) -> None:
        self.engine: AsyncLLMEngine | None = None
        self.serving: _Serving | None = None
        self.target: Servable | None = None
        self.error: BaseException | None = None
        self.started = 0.0
        self.closed = False


def create_app(llm_or_engine: Servable | Callable[[], Servable], served_model_name: str,
               api_key: str | None = None, *, allowed_origins: list[str] | None = None,
               on_ready: Callable[[Servable, AsyncLLMEngine], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the FastAPI app around a model or engine. The engine thread runs while the app is up.

    `llm_or_engine` may also be a loader (a function returning an LLM or engine): it then runs in a
    thread when the app starts, so the server answers (/health: 503 "loading"; the API: 503) while the
    model loads. `on_ready(target, engine)` is called once it is loaded, `on_error(exc)` if loading fails.
    `allowed_origins` (e.g. ["*"] or ["http://localhost:3000"]) enables CORS for those origins.
    """
    slot = _Model()
    metrics = ServerMetrics(lambda: slot.engine, served_model_name)
    started = int(time.time())

    def fill(target: Servable, start: bool = False) -> AsyncLLMEngine:
        engine = _as_engine(target)
        if engine.observer is None:
            engine.observer = metrics

        def fatal(exc: BaseException) -> None:  # e.g. a rank of the parallel group died: the server stops
            slot.error = exc
            if on_error is not None:
                on_error(exc)

        engine.on_fatal = fatal
        if start:  # before it is published: AsyncLLMEngine.start is not safe to race with a request's
            engine.start()
        slot.serving = _Serving(engine, served_model_name)
        slot.target, slot.engine = target, engine  # engine last: it is what "ready" means
        return engine

    lazy = callable(llm_or_engine) and not isinstance(llm_or_engine, (LLM, LLMEngine, AsyncLLMEngine))
    if not lazy:
        fill(llm_or_engine)  # type: ignore[arg-type]

    def load() -> None:
        try:
            target = llm_or_engine()  # type: ignore[operator]
            if slot.closed:
                return
            engine = fill(target, start=True)
            if on_ready is not None:
                on_ready(target, engine)
        except BaseException as exc:  # noqa: BLE001 - reported on /health and to on_error
            slot.error = exc
            log.error("loading the model failed: %s", exc)
            if on_error is not None:
                on_error(exc)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        slot.started = time.monotonic()
        if lazy:
            threading.Thread(target=load, name="moeserve-load", daemon=True).start()
        elif slot.engine is not None:
            slot.engine.start()
        yield
        slot.closed = True
        if slot.engine is not None:
            slot.engine.shutdown()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise _Unauthorized()

    def serving() -> _Serving:
        if slot.serving is None or slot.engine is None:
            raise _NotReady()
        return slot.serving

    # With an API key the interactive docs and the schema would be an open door: they are off then.
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="moeserve", lifespan=lifespan, **docs)
    app.add_middleware(_LimitBody)
    app.add_middleware(_CountRequests, metrics=metrics)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"],
                           allow_credentials="*" not in allowed_origins)
    app.add_middleware(_RequestId)  # outermost: every response has the id, errors and preflights too
    app.state.metrics, app.state.served_model_name, app.state.model = metrics, served_model_name, slot
    app.state.engine = slot.engine
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

    @app.exception_handler(_NotReady)
    async def _not_ready(_: Request, exc: _NotReady) -> JSONResponse:
        if slot.error is not None:
            return JSONResponse(error_body(f"the model failed to load: {slot.error}", 503, "server_error"), 503)
        return JSONResponse(error_body("the model is still loading; retry shortly", 503, "server_error",
                                       err_code="model_loading"), status_code=503, headers={"Retry-After": "1"})

    @app.get("/health")
    async def health() -> Any:
        engine = slot.engine
        if engine is None:
            if slot.error is not None:
                return JSONResponse({"status": "error", "model": served_model_name, "error": str(slot.error)}, 503)
            since = time.monotonic() - slot.started if slot.started else 0.0
            return JSONResponse({"status": "loading", "model": served_model_name, "loading_s": round(since, 1)},
                                503, headers={"Retry-After": "1"})
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
        engine = serving().engine
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": started,
                                            "owned_by": "moeserve", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions", dependencies=v1)
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await serving().completions(req, raw)

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        return await serving().chat(req, raw)

    @app.post("/v1/embeddings", dependencies=v1)
    async def create_embeddings(req: EmbeddingRequest, raw: Request) -> Any:
        return await serving().embeddings(req, raw)

    return app


class _Unauthorized(Exception):
    pass


class _NotReady(Exception):
    pass


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate `LLM(...)` arguments from uvicorn ones (everything else is rejected by name)."""
    llm_params = set(inspect.signature(LLM.__init__).parameters) - {"self", "model"}
    llm_kw = {k: v for k, v in kwargs.items() if k in llm_params}
    rest = {k: v for k, v in kwargs.items() if k not in llm_params}
    return llm_kw, rest


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def banner(llm: LLM, name: str, url: str) -> str:
    """The startup summary `run` prints on stderr once the model is loaded."""
    from gguf import GGMLQuantizationType

    from moeserve.engine.paged_cache import KVPool

    counts: dict[str, int] = {}
    for t in llm.file.tensors.values():
        qt = GGMLQuantizationType(int(t.tensor_type)).name
        counts[qt] = counts.get(qt, 0) + int(t.n_bytes)
    total = sum(counts.values()) or 1
    quants = ", ".join(f"{q} {100 * b / total:.0f}%" for q, b in sorted(counts.items(), key=lambda kv: -kv[1]))
    pool = llm.engine.pool
    kv_bytes = pool.num_blocks * KVPool.bytes_per_block(llm.config, pool.dtype)
    c = llm.config
    moe = f", {c.n_experts} experts ({c.n_experts_used} per token)" if c.is_moe else ""
    lines = [
        f"model:    {llm.path} ({_gib(os.path.getsize(llm.path))}) as {name!r}",
        f"arch:     {c.arch}, {c.n_layers} layers{moe}",
        f"weights:  {quants}",
        f"context:  {llm.max_model_len} tokens (model: {c.context_length})",
        f"KV pool:  {pool.num_blocks} blocks x 16 tokens = {pool.num_blocks * 16} tokens, {_gib(kv_bytes)} "
        f"({str(pool.dtype).replace('torch.', '')})" + ("" if llm.engine.step_reserve is None else
                                                          f"; {_gib(llm.engine.step_reserve)} kept free for a step's "
                                                          f"activations (profiled)"),
        f"kernels:  {llm.kernels} on {llm.device}" + (f", {_threads()} threads" if llm.device.type == "cpu" else ""),
        f"serving:  {url}/v1 (health: {url}/health)",
    ]
    return "\n".join(lines)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _setup_logging(log_level: str) -> None:
    """moeserve's own log lines (request log, load errors) on stderr at the server's level."""
    logger = logging.getLogger("moeserve")
    level = logging.DEBUG if log_level == "trace" else getattr(logging, log_level.upper(), logging.INFO)
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def run(model_path: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        served_model_name: str | None = None, log_level: str = "info", allowed_origins: list[str] | None = None,
        quiet: bool = False, **engine_kwargs: Any) -> None:
    """Serve a model until interrupted (what `moeserve serve` calls).

    The HTTP server starts at once and the model loads in a thread (/health answers 503 "loading"
    until it is ready); a startup banner goes to stderr when loading is done (not with `quiet`).
    If loading fails the server stops and the error is raised. `engine_kwargs` are `LLM(...)`
    arguments: max_model_len, kernels, num_kv_blocks, kv_cache_memory, kv_cache_dtype, max_num_seqs,
    max_num_batched_tokens, enable_prefix_caching, ...
    """
    import uvicorn

    from moeserve.engine.llm import default_model_path

    llm_kw, rest = _split_kwargs(engine_kwargs)
    if rest:
        raise TypeError(f"unknown server/engine arguments: {', '.join(sorted(rest))}")
    path = model_path or default_model_path()
    name = served_model_name or os.path.splitext(os.path.basename(path))[0]
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
    _setup_logging(log_level)
    show = not quiet
    if show:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        sys.stderr.write(f"moeserve: loading {os.path.basename(path)} ({_gib(size)}); the server answers on {url} "
                         f"meanwhile (/health: 503 until loaded)\n")
        sys.stderr.flush()
    t0 = time.perf_counter()
    server: uvicorn.Server | None = None

    def load() -> LLM:
        return LLM(path, progress=show and sys.stderr.isatty(), **llm_kw)

    def ready(target: Servable, _: AsyncLLMEngine) -> None:
        if show and isinstance(target, LLM):
            sys.stderr.write(f"moeserve: loaded in {time.perf_counter() - t0:.1f} s\n{banner(target, name, url)}\n")
            sys.stderr.flush()

    def failed(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(load, name, api_key=api_key, allowed_origins=allowed_origins, on_ready=ready, on_error=failed)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        if isinstance(app.state.model.target, LLM):
            app.state.model.target.close()  # the other ranks of a parallel group
    error = app.state.model.error
    if error is not None:
        raise error
