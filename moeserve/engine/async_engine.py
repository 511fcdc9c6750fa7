"""`AsyncLLMEngine`: the engine stepping in a background thread, streams for asyncio callers.

    engine = AsyncLLMEngine(llm.engine)
    stream = engine.generate("Hello", SamplingParams(max_tokens=8))  # validates now: RequestError
    async for delta in stream:        # RequestOutput deltas: new text, token ids, logprobs
        ...

Why a thread and not an asyncio task: a step is one long torch call that releases the GIL, so
in a thread it runs while the event loop keeps accepting requests, streaming bytes and noticing
disconnects. All engine state is touched only by that thread: callers hand it commands (add,
abort) through a queue, and it hands outputs back with `loop.call_soon_threadsafe`. New requests
therefore join between steps, and an abort frees the request's blocks before the next step.

The thread never dies on a bad step: the exception is delivered to every in-flight stream, all
requests are aborted (their blocks freed), and the engine keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from moeserve.engine.distributed import ParallelError
from moeserve.engine.engine import EngineStats, LLMEngine, OutputKind
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling import SamplingParams
from moeserve.engine.sequence import Sequence

log = logging.getLogger("moeserve.engine")
_ids = itertools.count()


class EngineObserver(Protocol):
    """Receives per-request timings (the server turns them into Prometheus histograms)."""

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def request_done(self, seconds: float, prompt_tokens: int, generation_tokens: int, finish_reason: str) -> None: ...


class EngineDeadError(RuntimeError):
    """The engine thread was shut down; no more requests can be served."""


@dataclass(eq=False)
class RequestStream:
    """Async iterator over one request's delta `RequestOutput`s; ends after the finished one.

    If the consumer stops early (client disconnect cancels it), leaving the `async for`
    aborts the request; `abort()` does the same explicitly and is idempotent.
    """

    request_id: str
    prompt_tokens: int
    _engine: AsyncLLMEngine
    _loop: asyncio.AbstractEventLoop
    _queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False
    arrival: float = field(default_factory=time.monotonic)
    _first: float | None = None
    _last: float | None = None
    _generated: int = 0

    def _put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            self.abort()


class AsyncLLMEngine:
    """Thread-driven wrapper of `LLMEngine` for asyncio servers."""

    def __init__(self, engine: LLMEngine, observer: EngineObserver | None = None) -> None:
        self.engine, self.observer = engine, observer
        self._commands: deque[Callable[[], None]] = deque()
        self._wake = threading.Condition()
        self._streams: dict[str, RequestStream] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats: EngineStats = engine.stats()
        self.on_fatal: Callable[[BaseException], None] | None = None  # a failure the engine cannot survive
        self.fatal: BaseException | None = None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        return self.engine.render_chat(messages, add_generation_prompt, tools, **template_kwargs)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop_forever, name="moeserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests ---------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                 ) -> RequestStream:
        """Validate and queue a request; raises `RequestError` at once if it is invalid."""
        seqs = self.engine.make_sequences(prompt, params, request_id or f"req-{next(_ids)}")
        return self.add_sequences(seqs)

    def add_sequences(self, seqs: list[Sequence]) -> RequestStream:
        """Queue already validated sequences (from `engine.make_sequences`)."""
        if self._stop:
            raise EngineDeadError("the engine is shutting down")
        self.start()
        stream = RequestStream(seqs[0].request_id, len(seqs[0].prompt_ids), self, asyncio.get_running_loop())
        self._submit(lambda: self._add(stream, seqs))
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (between steps); its blocks are freed before the next step runs."""
        self._submit(lambda: self._abort(request_id))

    def stats(self) -> EngineStats:
        """The stats as of the end of the last step (computed in the engine thread)."""
        return self._stats

    def _submit(self, command: Callable[[], None]) -> None:
        if self.fatal is not None:
            raise self.fatal
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # -- engine thread ----------------------------------------------------------------------
    def _add(self, stream: RequestStream, seqs: list[Sequence]) -> None:
        if stream.finished:  # aborted before it was even queued
            return
        try:
            self.engine.add_sequences(seqs, OutputKind.DELTA)
        except Exception as exc:  # only this request fails (e.g. a duplicate id): nothing else is touched
            stream._put(exc)
            return
        self._streams[stream.request_id] = stream

    def _abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _loop_forever(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._commands and not self.engine.has_unfinished():
                    self._wake.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            outputs: list[RequestOutput] = []
            for cmd in commands:
                try:
                    cmd()
                except Exception:  # a command failing must not take the other requests down with it
                    log.exception("engine command failed")
            try:
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
            except ParallelError as exc:  # a rank is gone: no later step can run; the server must stop
                log.error("%s; aborting %d requests and stopping", exc, len(self._streams))
                self.fatal = exc
                self._fail_all(exc)
                if self.on_fatal is not None:
                    self.on_fatal(exc)
                break
            except Exception as exc:  # never let one bad step kill the server
                log.exception("engine step failed; aborting %d requests", len(self._streams))
                self._fail_all(exc)
            # Stats first, then outputs: a caller that sees its request finish also sees its blocks freed.
            self._stats = self.engine.stats()
            self._dispatch(outputs)
        self._fail_all(self.fatal or EngineDeadError("the engine was shut down"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            new = sum(len(c.token_ids) for c in out.outputs)
            stream._generated += new
            if self.observer is not None and new:
                if stream._first is None:
                    self.observer.first_token(now - stream.arrival)
                else:
                    self.observer.inter_token(now - (stream._last or now))
            if new:
                stream._first = stream._first or now
                stream._last = now
            if out.finished:
                del self._streams[out.request_id]
                if self.observer is not None:
                    reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "stop")
                    self.observer.request_done(now - stream.arrival, stream.prompt_tokens, stream._generated, reason)
            stream._put(out)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self.engine.abort_all()
        self._stats = self.engine.stats()
        for s in streams.values():
            s._put(exc)
