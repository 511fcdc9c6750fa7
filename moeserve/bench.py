"""`moeserve bench`: llama-bench-style prompt-processing and generation speed of one GGUF.

Both run through the serving engine (scheduler, model runner, paged KV pool, sampler), so they
measure what `moeserve serve` runs:
pp: a random prompt of `n_prompt` tokens in one batched forward, one token sampled (prefix caching
off: a fresh cache each repetition).
tg: `n_gen` tokens decoded one at a time against the paged cache, greedy, from a one-token prompt.
Both report mean ± sd over `reps` repetitions, plus load time (file read, kernel setup, warm-up) and peak RSS.
With `profile`, one extra pp and tg run are timed per stage (attention, router, expert
gate/up/down, weighted sum, lm_head, other) — the seed's per-stage decode profile.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from moeserve.profiler import PROFILER, STAGES


@dataclass
class BenchResult:
    model: str
    kernels: str
    threads: int
    n_prompt: int
    n_gen: int
    reps: int
    load_s: float
    peak_rss_gb: float
    pp_tps: float
    pp_tps_sd: float
    tg_tps: float
    tg_tps_sd: float
    profile: dict[str, Any] = field(default_factory=dict)
    batch_invariant: bool = False  # the row-invariant kernels (`--batch-invariant`)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _run(engine: Any, prompt: list[int], max_tokens: int) -> float:
    """Seconds to run one greedy request to completion on `engine`."""
    from moeserve.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def _pp(llm: Any, prompt: list[int]) -> float:
    return _run(llm.engine, prompt, 1)


def _tg(llm: Any, n_gen: int, first: int) -> float:
    return _run(llm.engine, [first], n_gen)


def _profiled(fn: Any, n_tokens: int) -> dict[str, float]:
    """Milliseconds per token in each stage for one run of `fn`."""
    PROFILER.reset()
    PROFILER.enabled = True
    try:
        total = fn()
    finally:
        PROFILER.enabled = False
    s = PROFILER.snapshot()
    out = {k: 1e3 * s.get(k, 0.0) / n_tokens for k in STAGES}
    out["other"] = max(0.0, 1e3 * total / n_tokens - sum(out.values()))
    out["total"] = 1e3 * total / n_tokens
    return out


def run_bench(model: str, n_prompt: int = 512, n_gen: int = 128, threads: int = 2, reps: int = 3,
              kernels: str | None = None, profile: bool = False, progress: bool = True, **engine: Any) -> BenchResult:
    from moeserve.engine.llm import LLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    llm = LLM(model, kernels=kernels, max_model_len=max(n_prompt, n_gen) + 8, warmup=True, progress=progress,
              max_num_seqs=1, max_num_batched_tokens=max(512, n_prompt), enable_prefix_caching=False, **engine)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, llm.config.vocab_size, n_prompt).tolist()
    pp = [n_prompt / _pp(llm, prompt) for _ in range(reps)] if n_prompt else [0.0]
    tg = [n_gen / _tg(llm, n_gen, prompt[0] if prompt else 0) for _ in range(reps)] if n_gen else [0.0]
    prof: dict[str, Any] = {}
    if profile:
        if n_prompt:
            prof["prefill_ms_per_token"] = _profiled(lambda: _pp(llm, prompt), n_prompt)
        if n_gen:
            prof["decode_ms_per_token"] = _profiled(lambda: _tg(llm, n_gen, 0), n_gen)
    llm.close()  # the other ranks, if any
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return BenchResult(model=model, kernels=llm.kernels, threads=threads, n_prompt=n_prompt, n_gen=n_gen, reps=reps,
                       load_s=load_s, peak_rss_gb=_peak_rss_gb(), pp_tps=statistics.mean(pp), pp_tps_sd=sd(pp),
                       tg_tps=statistics.mean(tg), tg_tps_sd=sd(tg), profile=prof,
                       batch_invariant=llm.engine_config.batch_invariant)


def format_table(r: BenchResult) -> str:
    kernels = f"{r.kernels} (batch-invariant)" if r.batch_invariant else r.kernels
    rows = [
        "| model | kernels | threads | test | tokens/s |",
        "|---|---|---:|---|---:|",
        f"| {r.model} | {kernels} | {r.threads} | pp{r.n_prompt} | {r.pp_tps:.2f} ± {r.pp_tps_sd:.2f} |",
        f"| {r.model} | {kernels} | {r.threads} | tg{r.n_gen} | {r.tg_tps:.2f} ± {r.tg_tps_sd:.2f} |",
        "",
        f"load: {r.load_s:.1f} s   peak RSS: {r.peak_rss_gb:.2f} GB",
    ]
    for phase, stages in r.profile.items():
        rows += ["", f"{phase} profile:", "| stage | ms/token | share |", "|---|---:|---:|"]
        total = stages["total"] or 1e-9
        rows += [f"| {k} | {v:.3f} | {100 * v / total:.1f} % |" for k, v in stages.items()]
    return "\n".join(rows)
