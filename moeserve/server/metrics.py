"""Prometheus metrics for /metrics.

Latency histograms (time to first token, inter-token latency, end-to-end) are observed by the
engine thread as outputs are produced (`EngineObserver`), so they measure the engine rather
than how quickly the event loop got round to sending bytes. Everything the engine already
counts (queue depth, running sequences, KV blocks, tokens, prefix-cache hits, preemptions,
finished requests) is read from `EngineStats` at scrape time by a custom collector, so there is
one source of truth and nothing to keep in sync. Each app gets its own registry, so several
servers (e.g. in tests) can live in one process. The engine may be given as a function returning
it (None while the model is still loading: the engine-state metrics are then absent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeserve.engine.async_engine import AsyncLLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                    40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


EngineRef = AsyncLLMEngine | Callable[[], AsyncLLMEngine | None]


def _resolve(engine: EngineRef) -> AsyncLLMEngine | None:
    return engine if isinstance(engine, AsyncLLMEngine) else engine()


class _EngineCollector(Collector):
    def __init__(self, engine: EngineRef, model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterator[Metric]:
        engine = _resolve(self.engine)
        if engine is None:  # still loading
            return
        s = engine.stats()
        p = s.pool
        lbl = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"moeserve_{name}", doc, labels=lbl)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"moeserve_{name}", doc, labels=lbl)
            c.add_metric([self.model], value)
            return c

        yield gauge("num_requests_waiting", "Requests waiting to be scheduled (queue depth).", s.waiting_requests)
        yield gauge("num_requests_running", "Requests with at least one running sequence.", s.running_requests)
        yield gauge("num_seqs_running", "Sequences in the running batch.", s.running_seqs)
        yield gauge("kv_blocks_total", "KV-cache blocks in the pool (16 tokens each).", p.num_blocks)
        yield gauge("kv_blocks_used", "KV-cache blocks referenced by live sequences.", p.used_blocks)
        yield gauge("kv_blocks_free", "Allocatable KV-cache blocks (including cached prefixes).", p.free_blocks)
        yield gauge("kv_blocks_cached", "Free KV-cache blocks still holding a reusable prefix.", p.cached_blocks)
        yield gauge("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", p.used_blocks / p.num_blocks)
        yield counter("prompt_tokens", "Prompt tokens of accepted requests.", s.prompt_tokens)
        yield counter("prompt_tokens_computed", "Prompt tokens run through the model (prefix hits excluded).",
                      s.computed_prompt_tokens)
        yield counter("generation_tokens", "Generated tokens.", s.generation_tokens)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", p.prefix_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", p.prefix_hits)
        yield counter("num_preemptions", "Sequences preempted (blocks freed, recomputed later).", s.preemptions)
        yield counter("engine_steps", "Batched forward steps.", s.steps)
        fin = CounterMetricFamily("moeserve_request_finished", "Finished requests by finish reason.",
                                  labels=["model_name", "finish_reason"])
        for reason, n in sorted(s.finished.items()):
            fin.add_metric([self.model, reason], n)
        yield fin


class ServerMetrics:
    """The app's registry; also the engine's `EngineObserver` for latency histograms."""

    def __init__(self, engine: EngineRef, model: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.http_requests = Counter("moeserve_http_requests", "HTTP requests by endpoint and status code.",
                                     ["endpoint", "status"], registry=self.registry)
        self.ttft = Histogram("moeserve_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("moeserve_inter_token_latency_seconds", "Time between successive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("moeserve_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine, model))

    # EngineObserver (called from the engine thread; prometheus_client is thread-safe)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_done(self, seconds: float, prompt_tokens: int, generation_tokens: int, finish_reason: str) -> None:
        self.e2e.observe(seconds)
