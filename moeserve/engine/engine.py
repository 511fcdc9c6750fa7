"""`LLMEngine`: requests in, one batched forward per step, outputs out (synchronous core).

    engine = llm.engine                     # or LLMEngine(model, tokenizer, config)
    rid = engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step():
            ...

LLMEngine -> Scheduler/BlockAllocator -> ModelRunner (nano-vllm's split): the engine validates and
tokenizes requests, the scheduler decides each step's tokens over the paged KV pool, the model
runner turns them into one forward, and the engine samples. `LLM.generate` drives it to
completion; `AsyncLLMEngine` drives it from a background thread for the server. Stepping is not
thread-safe: one thread calls `step`/`add_*`/`abort_*` (`make_sequences` is safe from any thread).

Outputs follow vLLM's `RequestOutputKind`: FINAL_ONLY requests report once, cumulatively, when
all their completions are done; DELTA requests report at every step in which they produced
something, with only the new tokens, logprobs and the text that can no longer be retracted by a
stop string.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from moeserve.engine.cuda_graphs import largest_bucket
from moeserve.engine.distributed import Driver
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.paged_cache import BLOCK_SIZE, BlockAllocator, KVPool, PoolStats, parse_memory
from moeserve.engine.runner import ModelRunner, may_capture, pool_budget, profile_activations
from moeserve.engine.sampling import Sampler, SamplingParams
from moeserve.engine.scheduler import Scheduler, SchedulerOutput, SeqState, SeqStatus
from moeserve.engine.sequence import Sequence, request_output
from moeserve.errors import RequestError
from moeserve.model.decoder import Decoder

Prompt = str | Seq[int]

DEFAULT_KV_MEMORY = 2 * 1024**3  # bytes; the pool never exceeds what max_num_seqs full sequences need


# Bounds that no machine reaches (a step of 2**20 tokens needs ~8 GiB per 2048-wide float32 hidden state alone),
# so that a mistyped knob is an error, not a host list of 10**12 ints or a 10**9-row graph buffer.
MAX_NUM_SEQS = 65536
MAX_NUM_BATCHED_TOKENS = 2**20


def kv_dtype(name: str, device: torch.device) -> torch.dtype:
    """The KV pool's dtype: `auto` is float32 on a CPU (exact) and float16 on a GPU (half the memory)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)
    if dtype is None:
        raise RequestError(f"kv_cache_dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {name!r}")
    return dtype


def gpu_kv_budget(model: Decoder, c: EngineConfig, dtype: torch.dtype,
                  driver: Driver | None = None) -> tuple[int, int]:
    """Bytes for the KV pool on a GPU (vLLM's --gpu-memory-utilization), and the bytes measured for steps beside
    it: the share `utilization` of the card's memory, less what is already taken (the weights, other processes)
    and what a step needs on top.

    That last part is measured, not guessed: a dummy step of `max_num_batched_tokens` rows (the largest the
    scheduler sends) and, when decode steps will be captured, one of `max_num_seqs` rows (the captured graphs
    keep their own memory pool) run first, and their peaks are kept free. So a `max_num_batched_tokens=8192`
    engine gets a smaller pool instead of running out of memory in its first long prefill. With a `driver`
    (rank 0 of a parallel group) every rank runs the step with it and works out its own budget; every pool has
    the same blocks, so the smallest budget decides."""
    rows = min(c.max_num_batched_tokens, c.max_num_seqs * model.max_positions)  # no step can be larger
    steps = [("max_num_batched_tokens", c.max_num_batched_tokens, rows, min(rows, c.max_num_seqs))]
    if may_capture(model, c.enforce_eager, driver):  # the captured graphs' own pool
        graph_rows = largest_bucket(c.max_num_seqs)
        steps.append(("max_num_seqs", c.max_num_seqs, graph_rows, graph_rows))
    reserve, group_budget = 0, None
    for knob, value, rows, sampled in steps:
        peak = None
        with driver.profile(rows, sampled, dtype, c.gpu_memory_utilization) if driver else contextlib.nullcontext():
            with contextlib.suppress(torch.cuda.OutOfMemoryError):  # (a RuntimeError: the driver blames the group)
                peak = profile_activations(model, dtype, rows, sampled)
            if driver is not None:  # every rank has said its budget: the workers wait for this
                group_budget = driver.smallest(-1 if peak is None else pool_budget(model, c.gpu_memory_utilization,
                                                                                    peak))
        if peak is None:
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(model.device)
            raise RequestError(f"one step of {rows} rows ({knob}={value}) does not fit in the {free / 2**30:.2f} "
                               f"GiB the {total / 2**30:.0f} GiB GPU has free after loading the weights: lower {knob}")
        reserve += peak
    budget = group_budget if group_budget is not None else pool_budget(model, c.gpu_memory_utilization, reserve)
    return max(0, budget), reserve


class OutputKind(enum.Enum):
    FINAL_ONLY = "final_only"
    DELTA = "delta"


@dataclass
class EngineConfig:
    """Knobs of the serving engine (also accepted by `LLM(...)` and `moeserve serve`)."""

    num_kv_blocks: int | None = None  # exact pool size; overrides kv_cache_memory
    kv_cache_memory: int | str | None = None  # pool budget in bytes or '2GiB'; default DEFAULT_KV_MEMORY
    kv_cache_dtype: str = "auto"  # auto: float32 on a CPU, float16 on a GPU; or float32 / float16 / bfloat16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # per step: decode tokens + prefill chunks
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9  # on a GPU, the share of its memory weights + KV pool + activations may use
    enforce_eager: bool = False  # never capture CUDA graphs (every step runs the forward from Python)
    batch_invariant: bool = False  # a request's logits (greedy tokens) never depend on the batch it runs in: the
    # kernels are chosen when the model is loaded (`LLM(batch_invariant=True)`); the engine checks its model has them

    def validate(self) -> None:
        """One `RequestError` naming the bad field, before a model is loaded or a pool is sized."""
        def whole(name: str, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum or \
                    (maximum is not None and v > maximum):
                bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
                raise RequestError(f"{name} must be a whole number {bounds}, got {v!r}")

        whole("num_kv_blocks", 1, optional=True)
        whole("max_num_seqs", 1, MAX_NUM_SEQS)
        whole("max_num_batched_tokens", 1, MAX_NUM_BATCHED_TOKENS)
        if self.kv_cache_memory is not None:
            try:
                parse_memory(self.kv_cache_memory)
            except (TypeError, ValueError) as exc:
                raise RequestError(f"kv_cache_memory: {exc}") from None
        kv_dtype(self.kv_cache_dtype, torch.device("cpu"))
        u = self.gpu_memory_utilization
        if not isinstance(u, (int, float)) or isinstance(u, bool) or not 0.0 < u <= 1.0:
            raise RequestError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")


@dataclass
class EngineStats:
    """Counters and gauges for /metrics and /health; totals are since the engine started."""

    waiting_requests: int
    running_requests: int
    waiting_seqs: int
    running_seqs: int
    pool: PoolStats
    prompt_tokens: int  # prompt tokens of accepted requests
    computed_prompt_tokens: int  # prompt tokens actually run through the model (cache hits excluded)
    generation_tokens: int
    preemptions: int
    finished: dict[str, int]  # finish_reason -> requests
    steps: int


@dataclass(eq=False)
class _Request:
    request_id: str
    kind: OutputKind
    states: list[SeqState]
    arrival: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return all(s.seq.finished for s in self.states)


class LLMEngine:
    """The continuous-batching engine over one model: validation, scheduling, the runner, sampling."""

    def __init__(self, model: Decoder, tokenizer: Any = None, config: EngineConfig | None = None, *,
                 source: str = "the model", chat_template: str | None = None, driver: Driver | None = None) -> None:
        """`model` fixes the context (`max_model_len` = its RoPE positions) and brings its backend's greedy
        kernel; `tokenizer` may be None (then prompts are token ids); `source` names the model in errors;
        `chat_template` is the GGUF's Jinja template (ChatML when None); `driver`: rank 0 of a parallel group
        (`engine/distributed.py`), which sends every step to the other ranks."""
        self.model, self.tokenizer, self.config, self.source = model, tokenizer, config or EngineConfig(), source
        self.chat_template = chat_template
        c, cfg = self.config, model.cache_config  # the KV pool holds this rank's KV heads
        c.validate()
        if c.batch_invariant and not getattr(model, "batch_invariant", False):
            raise RequestError("batch_invariant needs a model loaded with batch-invariant kernels "
                               "(LLM(..., batch_invariant=True), or select_backend(..., batch_invariant=True))")
        self.max_model_len = model.max_positions
        dtype = kv_dtype(c.kv_cache_dtype, model.device)
        self.step_reserve: int | None = None  # GPU bytes kept free for one step's activations (profiled)
        budget_name = f"the KV cache budget {c.kv_cache_memory!r}"  # what a pool of no block is blamed on
        if c.num_kv_blocks is not None:
            num_blocks = c.num_kv_blocks
        else:
            if c.kv_cache_memory is not None:
                budget = parse_memory(c.kv_cache_memory)
            elif model.device.type == "cuda":
                budget, self.step_reserve = gpu_kv_budget(model, c, dtype, driver)
                budget_name = (f"gpu_memory_utilization={c.gpu_memory_utilization} (after the weights and one "
                               f"step's activations)")
            else:
                budget = DEFAULT_KV_MEMORY
            wanted = c.max_num_seqs * (-(-self.max_model_len // BLOCK_SIZE))
            num_blocks = min(budget // KVPool.bytes_per_block(cfg, dtype), wanted)
        if num_blocks < 1:
            raise RequestError(f"{budget_name} holds no KV block of {KVPool.bytes_per_block(cfg, dtype)} bytes")
        if driver is not None:
            driver.start(num_blocks, dtype)  # every rank's pool: the same blocks, its own heads
        self.pool = KVPool(cfg, num_blocks, dtype, model.device)
        self.allocator = BlockAllocator(num_blocks, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, self.allocator, c.max_num_seqs, c.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.pool, c.max_num_seqs, c.enforce_eager, driver)
        self.sampler = Sampler(model.argmax)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.reset_stats()

    def reset_stats(self) -> None:
        """Zero the counters (after warm-up, so /metrics counts only real requests)."""
        self._prompt_tokens = self._computed_prompt_tokens = self._generation_tokens = self._steps = 0
        self._finished: dict[str, int] = {}
        self.scheduler.num_preemptions = 0
        self.allocator.prefix_queries = self.allocator.prefix_hits = 0

    # -- requests ---------------------------------------------------------------------------
    def check_ids(self, ids: list[int], what: str) -> list[int]:
        """Validate token ids against the vocabulary and the context (raises `RequestError`)."""
        vocab = self.model.config.vocab_size
        if not ids:
            raise RequestError(f"{what} is empty")
        bad = [i for i in ids if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < vocab]
        if bad:
            raise RequestError(f"{what} contains ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(ids) > self.max_model_len:
            raise RequestError(
                f"{what} has {len(ids)} tokens, more than the maximum context length of {self.max_model_len}")
        return [int(i) for i in ids]

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.source} has no tokenizer; pass prompts as lists of token ids")
            return prompt, self.encode_text(prompt)
        return None, list(prompt)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize a prompt, refusing first, by its size alone, one that cannot fit the context.

        A text of N bytes is at least N / max_token_bytes tokens: an 8 MB prompt would otherwise cost seconds
        of tokenizer time and a GB of its memory just to learn that it is too long."""
        n = len(text)  # characters: a lower bound of the bytes, enough to refuse most oversized texts
        if n <= self.max_model_len * self.tokenizer.max_token_bytes:
            n = len(text.encode("utf-8", "surrogatepass"))
        if n // self.tokenizer.max_token_bytes > self.max_model_len:
            raise RequestError(f"prompt is at least {n} bytes, so at least {n // self.tokenizer.max_token_bytes} "
                               f"tokens: more than the maximum context length of {self.max_model_len}")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The conversation as prompt text, through the model's chat template (sandboxed Jinja); `template_kwargs`
        become template variables (vLLM's `chat_template_kwargs`, e.g. Qwen3's `enable_thinking=False`)."""
        if self.tokenizer is None:
            raise RequestError(f"{self.source} has no tokenizer; chat needs one")
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                          **template_kwargs)

    @cached_property
    def _chat_template(self) -> Any:
        """The template, compiled once (a render holds no state: threads may share it)."""
        from moeserve.chat_template import ChatTemplate

        return ChatTemplate(self.chat_template, self.tokenizer.bos_token, self.tokenizer.eos_token, source=self.source)

    def make_sequences(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> list[Sequence]:
        """Tokenize and validate a request (raises `RequestError`); safe to call from any thread."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.encode_prompt(prompt)
        ids = self.check_ids(ids, "prompt")
        n = len(ids)
        if n >= self.max_model_len:
            raise RequestError(f"prompt has {n} tokens; the maximum context length is {self.max_model_len} "
                               "and at least one token must be generated")
        if n + 1 > self.pool.capacity_tokens:
            raise RequestError(f"prompt has {n} tokens but the KV cache holds only {self.pool.capacity_tokens} "
                               "tokens in total; raise kv_cache_memory or num_kv_blocks")
        wanted = n + min(params.max_tokens or 0, self.max_model_len - n)
        if wanted > self.pool.capacity_tokens:  # it could only ever be cut short: say so now
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs {wanted} KV slots but "
                               f"the KV cache holds only {self.pool.capacity_tokens} tokens in total; lower "
                               "max_tokens or raise kv_cache_memory / num_kv_blocks")
        if request_id is not None and request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        rid = request_id if request_id is not None else str(next(self._ids))  # itertools.count: atomic
        eos = frozenset(self.tokenizer.eos_token_ids) if self.tokenizer is not None else frozenset()
        seqs = []
        for i in range(params.n):
            s = Sequence(request_id=rid, prompt_ids=ids, params=params, prompt=text, index=i, eos_ids=eos,
                         device=self.model.device, tokenizer=self.tokenizer)
            if self.tokenizer is not None:
                from moeserve.tokenizer import StreamDecoder

                s.detok = StreamDecoder(self.tokenizer)
            seqs.append(s)
        return seqs

    def add_sequences(self, seqs: list[Sequence], kind: OutputKind = OutputKind.FINAL_ONLY) -> str:
        """Queue the sequences of one request (from `make_sequences`); they join at the next step."""
        rid = seqs[0].request_id
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        states = [self.scheduler.new_state(s) for s in seqs]
        self.requests[rid] = _Request(rid, kind, states)
        self._prompt_tokens += len(seqs[0].prompt_ids)
        for st in states:
            self.scheduler.add(st)
        return rid

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    kind: OutputKind = OutputKind.FINAL_ONLY) -> str:
        """Validate and queue one request; returns its id."""
        return self.add_sequences(self.make_sequences(prompt, params or SamplingParams(), request_id), kind)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; False if it is unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for st in req.states:
            if not st.seq.finished:
                st.seq.finish_reason = "abort"
            self.scheduler.finish(st)
        self._count_finished("abort")
        return True

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one batched forward, sample; returns the outputs this step produced."""
        sched = self.scheduler.schedule()
        touched: dict[str, _Request] = {}
        for st in sched.exhausted:  # alone and the pool is full: the sequence can grow no further
            st.seq.finish_reason = "length"
            if st.seq.detok is not None:  # as Sequence.append does on finishing: emit held-back bytes
                st.seq.text += st.seq.detok.flush()
            touched[st.seq.request_id] = self.requests[st.seq.request_id]
        if sched.chunks:
            self._run(sched)
            for c in sched.chunks:
                if c.samples:
                    touched[c.state.seq.request_id] = self.requests[c.state.seq.request_id]
        self._steps += 1
        outputs = []
        for rid, req in touched.items():
            for st in req.states:
                if st.seq.finished and st.status is not SeqStatus.FINISHED:
                    self.scheduler.finish(st)
            out = self._output(req)
            if out is not None:
                outputs.append(out)
            if req.finished:
                del self.requests[rid]
                self._count_finished(req.states[0].seq.finish_reason or "stop")
        return outputs

    def _run(self, sched: SchedulerOutput) -> None:
        """One forward over every chunk of the step (the runner), then sample the chunks that end a sequence."""
        for c in sched.chunks:
            n_prompt = len(c.state.seq.prompt_ids)
            self._computed_prompt_tokens += max(0, min(c.start + c.length, n_prompt) - c.start)
        sampled = [c.state.seq for c in sched.chunks if c.samples]
        # plain greedy rows need only the argmax: the runner returns token ids (one process: the backend's argmax
        # of the same logits the sampler would take; several ranks: no logit columns cross between them)
        argmax = bool(sampled) and all(s.params.argmax_only for s in sampled)
        out = self.runner.execute(sched.chunks, argmax=argmax)
        self.scheduler.commit(sched)
        if sampled:
            if argmax:
                ids, lps = out.tolist(), [None] * len(sampled)
            else:
                res = self.sampler.sample(out, [s.params for s in sampled], [s.generator for s in sampled],
                                          [s.all_ids for s in sampled], [s.output_ids for s in sampled])
                ids, lps = res.token_ids.tolist(), res.logprobs
            for s, tok, lp in zip(sampled, ids, lps, strict=True):
                s.append(int(tok), lp, self.max_model_len)
            self._generation_tokens += len(sampled)

    def _output(self, req: _Request) -> RequestOutput | None:
        if req.kind is OutputKind.FINAL_ONLY:
            return request_output([s.seq for s in req.states]) if req.finished else None
        outs = []
        for st in req.states:
            s = st.seq
            new = s.output_ids[st.sent:]
            if st.final_sent or not (new or s.finished):
                continue
            lps = s.logprobs[st.sent:] if s.params.logprobs is not None else None
            outs.append(CompletionOutput(index=s.index, text=s.stream_delta(), token_ids=list(new),
                                         finish_reason=s.finish_reason,
                                         cumulative_logprob=s.cumulative_logprob if lps is not None else None,
                                         logprobs=lps, stop_reason=s.stop_reason))
            st.sent, st.final_sent = len(s.output_ids), s.finished
        if not outs:
            return None
        first = req.states[0].seq
        return RequestOutput(request_id=req.request_id, prompt=first.prompt, prompt_token_ids=first.prompt_ids,
                             outputs=outs, finished=req.finished, num_cached_tokens=first.num_cached_tokens)

    def _count_finished(self, reason: str) -> None:
        self._finished[reason] = self._finished.get(reason, 0) + 1

    # -- observability ----------------------------------------------------------------------
    def stats(self) -> EngineStats:
        sch = self.scheduler
        waiting_reqs = {s.seq.request_id for s in sch.waiting}
        running_reqs = {s.seq.request_id for s in sch.running}
        return EngineStats(
            waiting_requests=len(waiting_reqs - running_reqs), running_requests=len(running_reqs),
            waiting_seqs=len(sch.waiting), running_seqs=len(sch.running), pool=self.allocator.stats(),
            prompt_tokens=self._prompt_tokens, computed_prompt_tokens=self._computed_prompt_tokens,
            generation_tokens=self._generation_tokens, preemptions=sch.num_preemptions,
            finished=dict(self._finished), steps=self._steps,
        )
