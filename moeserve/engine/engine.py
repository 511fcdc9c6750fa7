"""`LLMEngine`: requests in, one batched forward per step, outputs out (synchronous core).

    engine = LLMEngine(llm)
    rid = engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step():
            ...

The engine owns the paged KV pool and the scheduler; the model, tokenizer and sampler come from
the `LLM`. `LLM.generate` drives it to completion; `AsyncLLMEngine` drives it from a background
thread for the server. It is not thread-safe by itself: one thread calls every method.

Outputs follow vLLM's `RequestOutputKind`: FINAL_ONLY requests report once, cumulatively, when
all their completions are done; DELTA requests report at every step in which they produced
something, with only the new tokens, logprobs and the text that can no longer be retracted by a
stop string.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.paged_cache import BLOCK_SIZE, BlockAllocator, KVPool, PagedDecodeBatch, PoolStats, parse_memory
from moeserve.engine.sampling import SamplingParams
from moeserve.engine.scheduler import Scheduler, SchedulerOutput, SeqState, SeqStatus
from moeserve.engine.sequence import Sequence, request_output
from moeserve.errors import RequestError
from moeserve.model.layers import SeqSlice

if TYPE_CHECKING:
    from moeserve.engine.llm import LLM, Prompt

DEFAULT_KV_MEMORY = 2 * 1024**3  # bytes; the pool never exceeds what max_num_seqs full sequences need


class OutputKind(enum.Enum):
    FINAL_ONLY = "final_only"
    DELTA = "delta"


@dataclass
class EngineConfig:
    """Knobs of the serving engine (also accepted by `LLM(...)` and `moeserve serve`)."""

    num_kv_blocks: int | None = None  # exact pool size; overrides kv_cache_memory
    kv_cache_memory: int | str | None = None  # pool budget in bytes or '2GiB'; default DEFAULT_KV_MEMORY
    kv_cache_dtype: str = "float32"  # or "bfloat16" (half the memory, slightly different numbers)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # per step: decode tokens + prefill chunks
    enable_prefix_caching: bool = True


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
    """The continuous-batching engine over one `LLM`'s model, tokenizer and sampler."""

    def __init__(self, llm: LLM, config: EngineConfig | None = None) -> None:
        self.llm, self.config = llm, config or EngineConfig()
        c, cfg = self.config, llm.config
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(c.kv_cache_dtype)
        if dtype is None:
            raise RequestError(f"kv_cache_dtype must be 'float32' or 'bfloat16', got {c.kv_cache_dtype!r}")
        if c.num_kv_blocks is not None:
            num_blocks = c.num_kv_blocks
        else:
            budget = parse_memory(c.kv_cache_memory) if c.kv_cache_memory is not None else DEFAULT_KV_MEMORY
            wanted = c.max_num_seqs * (-(-llm.max_model_len // BLOCK_SIZE))
            num_blocks = min(budget // KVPool.bytes_per_block(cfg, dtype), wanted)
        if num_blocks < 1:
            raise RequestError(f"the KV cache budget {c.kv_cache_memory!r} holds no block of "
                               f"{KVPool.bytes_per_block(cfg, dtype)} bytes")
        self.pool = KVPool(cfg, num_blocks, dtype, llm.device)
        self.allocator = BlockAllocator(num_blocks, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, self.allocator, c.max_num_seqs, c.max_num_batched_tokens)
        self.max_model_len = llm.max_model_len
        self.requests: dict[str, _Request] = {}
        self._prompt_tokens = self._computed_prompt_tokens = self._generation_tokens = self._steps = 0
        self._finished: dict[str, int] = {}
        # native decode attention on a float32 pool reads the paged KV cache in place (see `_run`)
        blocks = getattr(llm.model, "blocks", [])
        self._attention_reads_pool = dtype is torch.float32 and bool(blocks) and all(
            getattr(b.attn, "fast_decode", None) is not None for b in blocks)

    # -- requests ---------------------------------------------------------------------------
    def make_sequences(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> list[Sequence]:
        """Tokenize and validate a request (raises `RequestError`); safe to call from any thread."""
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        seqs = self.llm.make_sequences(prompt, params)
        n = len(seqs[0].prompt_ids)
        if n + 1 > self.pool.capacity_tokens:
            raise RequestError(f"prompt has {n} tokens but the KV cache holds only {self.pool.capacity_tokens} "
                               "tokens in total; raise kv_cache_memory or num_kv_blocks")
        if request_id is not None:
            if request_id in self.requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            for s in seqs:
                s.request_id = request_id
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
        """One `Decoder.forward` over every chunk of the step, then sample the chunks that end a sequence."""
        ids: list[int] = []
        positions: list[int] = []
        slices, rows, sampled = [], [], []
        for c in sched.chunks:
            st = c.state
            slices.append(SeqSlice(start=len(ids), length=c.length, pos=c.start, kv=st.kv))
            ids.extend(st.tokens(c.start, c.start + c.length))
            positions.extend(range(c.start, c.start + c.length))
            if c.samples:
                rows.append(len(ids) - 1)
                sampled.append(st.seq)
            n_prompt = len(st.seq.prompt_ids)
            self._computed_prompt_tokens += max(0, min(c.start + c.length, n_prompt) - c.start)
        dev = self.llm.device
        batch = None
        # A pure decode step: one attention call per layer for all sequences. A single sequence takes it
        # only when attention reads the pool in place (native); otherwise its contiguous-view read is cheaper.
        if len(ids) == len(slices) and (len(slices) > 1 or self._attention_reads_pool):
            batch = PagedDecodeBatch([c.state.kv for c in sched.chunks], positions)
        logits = self.llm.model.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), slices,
                                        torch.tensor(rows, device=dev, dtype=torch.long), batch)
        self.scheduler.commit(sched)
        if sampled:
            self.llm._sample(sampled, logits)
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
