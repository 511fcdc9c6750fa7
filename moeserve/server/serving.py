"""The OpenAI completions and chat-completions handlers: requests to engine streams to JSON.

Each prompt of a request becomes one engine request (its `n` completions are sequences of that
request); their delta streams are merged as they arrive, so a streaming response interleaves
choices exactly as the engine produces them. A streaming client that disconnects cancels the
generator (sse-starlette watches the socket), and a non-streaming one is watched by
`until_disconnected`; either way leaving the stream aborts the engine request, which frees its
KV blocks before the next step.

Chat requests with `tools` are rendered and parsed by `tools.py` (Hermes-style `<tool_call>` blocks
become OpenAI `tool_calls`, whole or as stream deltas); structured output is a grammar carried by
the SamplingParams (`engine/guided.py`). /v1/embeddings runs its forwards in a worker thread
(`engine/embeddings.py`), beside the engine. See docs/api.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from moeserve.chat_template import CHATML_TEMPLATE
from moeserve.engine import embeddings
from moeserve.engine.async_engine import AsyncLLMEngine, RequestStream
from moeserve.engine.guided import ll_tokenizer
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.tools import ToolCallStream, parse_tool_calls, prepare_messages
from moeserve.errors import RequestError
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

T = TypeVar("T")


def error_body(message: str, code: int = 400, err_type: str = "invalid_request_error", param: str | None = None,
               err_code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: the official client turns it into BadRequestError etc. with this message."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": err_code or code}}


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it if the client goes away first (returns None then)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done() and not task.cancelled():
        return task.result()  # (re-raises the work's own exception)
    task.cancel()  # the client left first: a cancel only takes effect later, so never ask the task for a result
    return None


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (prompt index, delta) from several request streams as they arrive."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except BaseException as exc:  # delivered to the consumer, including cancellation
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


@dataclass
class _Usage:
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    seen: set[int] = field(default_factory=set)

    def add(self, i: int, out: RequestOutput) -> None:
        if i not in self.seen:
            self.seen.add(i)
            self.prompt += len(out.prompt_token_ids)
            self.cached += out.num_cached_tokens
        self.completion += sum(len(c.token_ids) for c in out.outputs)

    def json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion, "prompt_tokens_details": {"cached_tokens": self.cached}}


@dataclass
class _Choice:
    """Accumulates one choice of a non-streaming response."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, c: CompletionOutput) -> None:
        self.text += c.text
        self.token_ids += c.token_ids
        self.logprobs += c.logprobs or []
        self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


class OpenAIServing:
    """Holds the engine and the served model name; one method per endpoint."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.tokenizer = engine.tokenizer

    # -- helpers ----------------------------------------------------------------------------
    def check_model(self, model: str | None) -> JSONResponse | None:
        if model is not None and model != self.model_name:
            return JSONResponse(error_body(f"The model `{model}` does not exist; this server serves "
                                           f"`{self.model_name}`.", param="model", err_code="model_not_found"), 400)
        return None

    def token_str(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text (for logprobs) and its raw bytes (OpenAI's `bytes` field)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}", []
        raw = self.tokenizer.token_to_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    @staticmethod
    def top_k(lp: dict[int, float], k: int) -> list[tuple[int, float]]:
        """The k best entries of a logprob dict (the sampler inserts the top ones first)."""
        return list(lp.items())[:k]

    async def start(self, prompts: list[str | list[int]], params: Any) -> list[RequestStream]:
        """Validate and queue every prompt; if one is invalid none stays queued. Tokenization runs in a worker
        thread, so a long prompt never holds up the event loop (other clients, /health)."""
        vocab = self.engine.engine.model.config.vocab_size
        bad = sorted(t for t in (params.logit_bias or {}) if t >= vocab)
        if bad:
            raise RequestError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise RequestError("structured output needs a model with a tokenizer")
            await asyncio.to_thread(ll_tokenizer, self.tokenizer)  # built once, off the loop and the engine thread
        make = self.engine.engine.make_sequences
        groups = await asyncio.to_thread(lambda: [make(p, params, uuid.uuid4().hex) for p in prompts])
        streams: list[RequestStream] = []
        try:
            for seqs in groups:
                streams.append(self.engine.add_sequences(seqs))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return streams

    # -- /v1/completions --------------------------------------------------------------------
    def completion_logprobs(self, ids: list[int], lps: list[dict[int, float]], k: int, offset: int) -> dict[str, Any]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, lp in zip(ids, lps):
            text, _ = self.token_str(tid)
            tokens.append(text)
            token_lps.append(lp[tid])
            tops.append({self.token_str(t)[0]: v for t, v in self.top_k(lp, k)} if k else None)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    async def completions(self, req: CompletionRequest, raw: Request) -> Any:
        if (err := self.check_model(req.model)) is not None:
            return err
        params = req.to_sampling_params()
        streams = await self.start(req.prompts(), params)
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        k = req.logprobs

        def choice_index(i: int, c: CompletionOutput) -> int:
            return i * n + c.index

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncIterator[dict[str, str]]:
                usage, offsets = _Usage(), {}
                try:
                    async for i, out in merge(streams):
                        usage.add(i, out)
                        for c in out.outputs:
                            if not c.text and not c.finish_reason and not (k is not None and c.token_ids):
                                continue
                            idx = choice_index(i, c)
                            lp = None
                            if k is not None:
                                lp = self.completion_logprobs(c.token_ids, c.logprobs or [], k, offsets.get(idx, 0))
                            offsets[idx] = offsets.get(idx, 0) + len(c.text)
                            chunk = {"id": rid, "object": "text_completion", "created": created,
                                     "model": self.model_name,
                                     "choices": [{"index": idx, "text": c.text, "logprobs": lp,
                                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]}
                            if include_usage:
                                chunk["usage"] = None
                            yield {"data": json.dumps(chunk)}
                    if include_usage:
                        yield {"data": json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                   "model": self.model_name, "choices": [], "usage": usage.json()})}
                except RequestError as exc:
                    yield {"data": json.dumps(error_body(str(exc)))}
                except Exception as exc:  # engine failure mid-stream: tell the client, then end the stream
                    yield {"data": json.dumps(error_body(f"internal error: {exc}", 500, "server_error"))}
                yield {"data": "[DONE]"}

            return EventSourceResponse(events(), ping=15)

        async def collect() -> dict[str, Any]:
            usage, choices = _Usage(), {}
            async for i, out in merge(streams):
                usage.add(i, out)
                for c in out.outputs:
                    choices.setdefault(choice_index(i, c), _Choice()).add(c)
            result = []
            for idx in sorted(choices):
                ch = choices[idx]
                lp = self.completion_logprobs(ch.token_ids, ch.logprobs, k, 0) if k is not None else None
                result.append({"index": idx, "text": ch.text, "logprobs": lp, "finish_reason": ch.finish_reason,
                               "stop_reason": ch.stop_reason})
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": result, "usage": usage.json()}

        return await self._respond(raw, collect(), streams)

    async def _respond(self, raw: Request, work: Awaitable[dict[str, Any]], streams: list[RequestStream]) -> Any:
        try:
            body = await until_disconnected(raw, work)
        finally:
            for s in streams:
                s.abort()
        return JSONResponse(body) if body is not None else JSONResponse(error_body("client disconnected", 499), 499)

    # -- /v1/chat/completions ---------------------------------------------------------------
    def chat_logprobs(self, ids: list[int], lps: list[dict[int, float]], k: int) -> dict[str, Any]:
        content = []
        for tid, lp in zip(ids, lps):
            text, raw = self.token_str(tid)
            top = []
            for t, v in self.top_k(lp, k):
                ttext, traw = self.token_str(t)
                top.append({"token": ttext, "logprob": v, "bytes": traw})
            content.append({"token": text, "logprob": lp[tid], "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tools = req.tool_dicts() if req.tool_mode() not in (None, "none") else None
        template = self.engine.engine.chat_template or CHATML_TEMPLATE
        messages, tools = prepare_messages([m.to_template() for m in req.messages], tools, template)
        text = self.engine.render_chat(messages, req.add_generation_prompt, tools, **req.template_kwargs())
        return self.engine.engine.encode_text(text, add_special_tokens=False)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Any:
        if (err := self.check_model(req.model)) is not None:
            return err
        params = req.to_sampling_params()
        if self.tokenizer is None:
            raise RequestError("this model has no tokenizer; chat completions need one")
        prompt = await asyncio.to_thread(self.chat_prompt, req)  # template + tokenizer off the event loop
        streams = await self.start([prompt], params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        k = params.logprobs
        parse_tools = req.tool_mode() not in (None, "none")
        one_call = req.parallel_tool_calls is False

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, str]:
                body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": self.model_name, "choices": choices}
                if include_usage:
                    body["usage"] = usage
                return {"data": json.dumps(body)}

            async def events() -> AsyncIterator[dict[str, str]]:
                usage = _Usage()
                parsers = {i: ToolCallStream(1 if one_call else None) for i in range(params.n)} if parse_tools else {}
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(params.n)])
                try:
                    async for i, out in merge(streams):
                        usage.add(i, out)
                        for c in out.outputs:
                            if not c.text and not c.finish_reason and not (k is not None and c.token_ids):
                                continue
                            lp = self.chat_logprobs(c.token_ids, c.logprobs or [], k) if k is not None else None
                            delta: dict[str, Any] = {"content": c.text} if c.text else {}
                            finish = c.finish_reason
                            if parse_tools:
                                p = parsers[c.index]
                                text, calls = p.feed(c.text)
                                if c.finish_reason:
                                    rest, more = p.finish()
                                    text, calls = text + rest, calls + more
                                delta = {"content": text} if text else {}
                                if calls:
                                    delta["tool_calls"] = calls
                                if finish == "stop" and p.n_calls:
                                    finish = "tool_calls"
                                if not delta and not finish and lp is None:
                                    continue
                            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish}])
                    if include_usage:
                        yield chunk([], usage.json())
                except RequestError as exc:
                    yield {"data": json.dumps(error_body(str(exc)))}
                except Exception as exc:
                    yield {"data": json.dumps(error_body(f"internal error: {exc}", 500, "server_error"))}
                yield {"data": "[DONE]"}

            return EventSourceResponse(events(), ping=15)

        async def collect() -> dict[str, Any]:
            usage, choices = _Usage(), {}
            async for i, out in merge(streams):
                usage.add(i, out)
                for c in out.outputs:
                    choices.setdefault(c.index, _Choice()).add(c)
            result = []
            for idx in sorted(choices):
                ch = choices[idx]
                lp = self.chat_logprobs(ch.token_ids, ch.logprobs, k) if k is not None else None
                message: dict[str, Any] = {"role": "assistant", "content": ch.text}
                finish = ch.finish_reason
                if parse_tools:
                    content, calls = parse_tool_calls(ch.text)
                    if calls:
                        message = {"role": "assistant", "content": content,
                                   "tool_calls": calls[:1] if one_call else calls}
                        finish = "tool_calls" if finish == "stop" else finish
                result.append({"index": idx, "message": message, "logprobs": lp, "finish_reason": finish,
                               "stop_reason": ch.stop_reason})
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": result, "usage": usage.json()}

        return await self._respond(raw, collect(), streams)

    # -- /v1/embeddings ---------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest, raw: Request) -> Any:
        if (err := self.check_model(req.model)) is not None:
            return err
        engine = self.engine.engine
        inputs = req.inputs(engine.model.config.hidden_size)

        def run() -> tuple[list[list[int]], Any]:  # in a worker thread: the forwards never block the event loop
            ids = embeddings.tokenize(engine, inputs)
            return ids, embeddings.embed_ids(engine, ids, req.pooling, req.normalize)

        ids, vectors = await asyncio.to_thread(run)
        data = []
        for i, v in enumerate(vectors):
            value: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                          else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}
