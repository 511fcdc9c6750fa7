"""Aggregate decode throughput at 1, 4 and 16 concurrent streams: moeserve vs llama.cpp, same file, same run.

    python benchmarks/throughput_bench.py MODEL.gguf --streams 1 4 16 --tokens 64 --threads 2
    python benchmarks/throughput_bench.py            # a tiny random model, as a smoke test

moeserve: N requests with distinct random prompts go into the continuous-batching engine; once
every stream has finished its prefill, `--tokens` decode steps are timed. Each step is one
batched forward over all N streams (dense GEMMs and grouped MoE over N tokens, attention per
stream), then one sampling pass: aggregate tokens/s = N * steps / time.

llama.cpp (llama-cpp-python's low-level API, as llama-batched-bench does): the same N prompts
are prefilled, then each timed step is one `llama_decode` of a batch holding one token of each
of the N sequences, with greedy sampling of every stream on the host. The column is skipped when
`llama_cpp` is not importable (or with --no-llama).

Both engines run greedy decoding so every stream feeds back real, distinct tokens: feeding a
constant token would route every stream to the same experts and flatter batched MoE.
The two run one after the other (never both loaded), with the same thread count.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Distinct random prompts (no shared prefix, so the prefix cache cannot help)."""
    rng = np.random.default_rng(seed)
    hi = max(2, min(vocab, 32000) - 8)
    return [rng.integers(1, hi, size=length).tolist() for _ in range(n)]


def bench_moeserve(path: str, streams: list[int], prompt_len: int, tokens: int, warmup: int, kernels: str | None,
                   profile: bool = False) -> dict[int, float]:
    from moeserve import LLM, SamplingParams
    from moeserve.engine.engine import EngineConfig, LLMEngine

    top = max(streams)
    max_len = prompt_len + warmup + 2 * tokens + 8
    llm = LLM(path, kernels=kernels, max_model_len=max_len)
    results = {}
    for n in streams:
        engine = LLMEngine(llm, EngineConfig(max_num_seqs=top, max_num_batched_tokens=max(512, n * prompt_len),
                                             num_kv_blocks=n * (-(-max_len // 16)) + 1,
                                             enable_prefix_caching=False))
        steps = warmup + tokens * (2 if profile else 1) + 1
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
        for p in make_prompts(n, prompt_len, llm.config.vocab_size):
            engine.add_request(p, params)
        states = engine.scheduler.running
        while len(states) < n or any(s.num_computed < len(s.seq.prompt_ids) for s in states):
            engine.step()  # prefill (possibly chunked)
            states = engine.scheduler.running
        for _ in range(warmup):
            engine.step()
        t0 = time.perf_counter()
        for _ in range(tokens):
            engine.step()
        dt = time.perf_counter() - t0
        results[n] = n * tokens / dt
        if profile:  # the same number of steps again, timed per stage: ms per batched step
            from moeserve.bench import _profiled

            def timed(eng: LLMEngine = engine) -> float:
                t = time.perf_counter()
                for _ in range(tokens):
                    eng.step()
                return time.perf_counter() - t

            prof = _profiled(timed, tokens)
            print(f"  one {n}-stream step, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in prof.items() if v >= 0.05))
        engine.abort_all()
        print(f"moeserve   streams={n:3d}: {results[n]:8.1f} tok/s aggregate ({dt / tokens * 1e3:.1f} ms/step)",
              flush=True)
    del llm
    gc.collect()
    return results


def _llama_fill(batch, items: list[tuple[int, int, int, bool]]) -> None:  # batch: llama_cpp.llama_batch
    """Put (token, position, sequence, wants_logits) rows into a llama_batch."""
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits


def _llama_argmax(L, ctx, row: int, vocab: int) -> int:  # noqa: N803 - L is the llama_cpp module
    return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(vocab,)).argmax())


def _llama_streams(L, model, vocab: int, n: int, prompt_len: int, tokens: int, warmup: int,  # noqa: N803
                   threads: int) -> float:
    """Prefill n prompts in one batch, then time decode steps of one llama_decode over n tokens."""
    cp = L.llama_context_default_params()
    cp.n_ctx = n * (prompt_len + warmup + tokens + 8) + 256
    cp.n_batch = cp.n_ubatch = max(n * prompt_len, 512)
    cp.n_seq_max = n
    cp.kv_unified = True  # one KV buffer shared by all sequences, as llama-batched-bench -kvu
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    batch = L.llama_batch_init(max(n * prompt_len, n), 0, n)
    try:
        prompts = make_prompts(n, prompt_len, vocab)
        _llama_fill(batch, [(t, j, s, j == prompt_len - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode (prefill) failed")
        last = [_llama_argmax(L, ctx, (s + 1) * prompt_len - 1, vocab) for s in range(n)]
        t0 = time.perf_counter()
        for step in range(warmup + tokens):
            if step == warmup:
                t0 = time.perf_counter()
            _llama_fill(batch, [(last[s], prompt_len + step, s, True) for s in range(n)])
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            last = [_llama_argmax(L, ctx, s, vocab) for s in range(n)]
        return time.perf_counter() - t0
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)


def bench_llama_cpp(path: str, streams: list[int], prompt_len: int, tokens: int, warmup: int, threads: int,
                    ) -> dict[int, float]:
    import llama_cpp as L

    L.llama_backend_init()
    silence = L.llama_log_callback(lambda *a: None)  # keep a reference: llama.cpp holds the pointer
    L.llama_log_set(silence, None)
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    results = {}
    try:
        for n in streams:
            dt = _llama_streams(L, model, vocab, n, prompt_len, tokens, warmup, threads)
            results[n] = n * tokens / dt
            print(f"llama.cpp  streams={n:3d}: {results[n]:8.1f} tok/s aggregate ({dt / tokens * 1e3:.1f} ms/step)",
                  flush=True)
    finally:
        L.llama_model_free(model)
    return results


def tiny_model() -> str:
    from moeserve.testing import ModelSpec, write_model

    path = Path(tempfile.mkdtemp()) / "throughput-tiny.gguf"
    write_model(path, ModelSpec(n_layers=2, hidden_size=256, vocab_size=512, n_experts=8, n_experts_used=2))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (default: a tiny random model, smoke test only)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per stream count")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", default=None, choices=["fast", "reference"])
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp column")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    ap.add_argument("--profile", action="store_true", help="print moeserve's per-stage time of one batched step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or tiny_model()

    ours = bench_moeserve(path, args.streams, args.prompt_len, args.tokens, args.warmup, args.kernels, args.profile)
    theirs: dict[int, float] = {}
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama_cpp is not importable: skipping the llama.cpp column")
        else:
            theirs = bench_llama_cpp(path, args.streams, args.prompt_len, args.tokens, args.warmup, args.threads)

    print(f"\n{Path(path).name}: aggregate decode tokens/s (prompt {args.prompt_len}, {args.tokens} timed steps, "
          f"{args.threads} threads)")
    print("| streams | moeserve | llama.cpp | ratio |")
    print("|--------:|---------:|----------:|------:|")
    for n in args.streams:
        ref = theirs.get(n)
        cells = (f"{ref:.1f}", f"{ours[n] / ref:.2f}x") if ref else ("-", "-")
        print(f"| {n} | {ours[n]:.1f} | {cells[0]} | {cells[1]} |")
    if args.json:
        print(json.dumps({"model": path, "moeserve": ours, "llama_cpp": theirs}))


if __name__ == "__main__":
    main()
