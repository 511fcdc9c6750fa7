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
By default the two run one after the other (never both loaded), with the same thread count. With
`--rounds R` both are loaded and each stream count's timed steps alternate in R slices (moeserve,
llama.cpp, moeserve, ...): this VM's speed drifts by 20-40 % over tens of seconds, which a
sequential run charges to whichever engine it falls on. (llama.cpp repacks the Q4_K experts into
its own memory, so use it where both fit: the 4-layer file, not the full-size one on 24 GB.)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Distinct random prompts (no shared prefix, so the prefix cache cannot help)."""
    rng = np.random.default_rng(seed)
    hi = max(2, min(vocab, 32000) - 8)
    return [rng.integers(1, hi, size=length).tolist() for _ in range(n)]


class MoeserveStreams:
    """n streams in moeserve's continuous-batching engine, prefilled and warmed up; `run(k)` times k steps."""

    def __init__(self, llm, n: int, top: int, prompt_len: int, max_len: int, steps: int, warmup: int,
                 temperature: float = 0.0) -> None:
        from moeserve import SamplingParams
        from moeserve.engine.engine import EngineConfig

        self.engine = llm.make_engine(EngineConfig(max_num_seqs=top, max_num_batched_tokens=max(512, n * prompt_len),
                                                  num_kv_blocks=n * (-(-max_len // 16)) + 1,
                                                  enable_prefix_caching=False))
        params = SamplingParams(max_tokens=steps + warmup + 1, temperature=temperature, ignore_eos=True)
        for p in make_prompts(n, prompt_len, llm.config.vocab_size):
            self.engine.add_request(p, params)
        states = self.engine.scheduler.running
        while len(states) < n or any(s.num_computed < len(s.seq.prompt_ids) for s in states):
            self.engine.step()  # prefill (possibly chunked)
            states = self.engine.scheduler.running
        self.run(warmup)

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        return time.perf_counter() - t0

    def close(self) -> None:
        self.engine.abort_all()


def _llama_fill(batch, items: list[tuple[int, int, int, bool]]) -> None:  # batch: llama_cpp.llama_batch
    """Put (token, position, sequence, wants_logits) rows into a llama_batch."""
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits


class LlamaStreams:
    """The same n prompts in llama.cpp (llama-cpp-python's low-level API, as llama-batched-bench): one
    prefill batch, then each step is one `llama_decode` of a batch holding one token of each sequence,
    with greedy sampling of every stream on the host."""

    def __init__(self, L, model, vocab: int, n: int, prompt_len: int, steps: int, warmup: int,  # noqa: N803
                 threads: int) -> None:
        self.L, self.vocab, self.n, self.pos = L, vocab, n, prompt_len
        cp = L.llama_context_default_params()
        cp.n_ctx = n * (prompt_len + warmup + steps + 8) + 256
        cp.n_batch = cp.n_ubatch = max(n * prompt_len, 512)
        cp.n_seq_max = n
        cp.kv_unified = True  # one KV buffer shared by all sequences, as llama-batched-bench -kvu
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(model, cp)
        self.batch = L.llama_batch_init(max(n * prompt_len, n), 0, n)
        prompts = make_prompts(n, prompt_len, vocab)
        _llama_fill(self.batch,
                    [(t, j, s, j == prompt_len - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        if L.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode (prefill) failed")
        self.last = [self._argmax((s + 1) * prompt_len - 1) for s in range(n)]
        self.run(warmup)

    def _argmax(self, row: int) -> int:
        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, row), shape=(self.vocab,)).argmax())

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            _llama_fill(self.batch, [(self.last[s], self.pos, s, True) for s in range(self.n)])
            if self.L.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
            self.pos += 1
            self.last = [self._argmax(s) for s in range(self.n)]
        return time.perf_counter() - t0

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)


def load_llama(path: str):
    """(llama_cpp module, model, vocab size), or None when llama_cpp is not importable."""
    try:
        import llama_cpp as L
    except ImportError:
        print("llama_cpp is not importable: skipping the llama.cpp column")
        return None
    L.llama_backend_init()
    L._moeserve_silence = L.llama_log_callback(lambda *a: None)  # keep a reference: llama.cpp holds the pointer
    L.llama_log_set(L._moeserve_silence, None)
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return L, model, L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))


def _report(name: str, n: int, tps: float, dt_per_step: float) -> None:
    print(f"{name:10s} streams={n:3d}: {tps:8.1f} tok/s aggregate ({dt_per_step * 1e3:.1f} ms/step)", flush=True)


def _interleaved(llm, peer, n: int, top: int, prompt_len: int, max_len: int, per: int, rounds: int, warmup: int,
                 threads: int, profile: bool) -> tuple[float, float | None]:
    """One stream count: `rounds` alternating slices of `per` timed steps; (moeserve, llama.cpp or None) tok/s."""
    a = MoeserveStreams(llm, n, top, prompt_len, max_len, 2 * rounds * per, warmup)
    b = LlamaStreams(*peer, n, prompt_len, rounds * per, warmup, threads) if peer else None
    ta = tb = 0.0
    for _ in range(rounds):
        ta += a.run(per)
        tb += b.run(per) if b else 0.0
    ours = n * rounds * per / ta
    _report("moeserve", n, ours, ta / (rounds * per))
    theirs = None
    if b:
        theirs = n * rounds * per / tb
        _report("llama.cpp", n, theirs, tb / (rounds * per))
        b.close()
    if profile:  # the same number of steps again, timed per stage: ms per batched step
        from moeserve.bench import _profiled

        prof = _profiled(lambda: a.run(rounds * per), rounds * per)
        print(f"  one {n}-stream step, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in prof.items() if v >= 0.05))
    a.close()
    return ours, theirs


def bench(path: str, streams: list[int], prompt_len: int, tokens: int, warmup: int, threads: int,
          kernels: str | None, with_llama: bool, rounds: int = 1, profile: bool = False,
          batch_invariant: bool | None = None) -> tuple[dict[int, float], dict[int, float]]:
    """Aggregate tokens/s per stream count: (moeserve, llama.cpp). With rounds == 1 the engines run one after
    the other (moeserve for every stream count, then llama.cpp; never both loaded). With rounds > 1 both are
    loaded (their weights share the file's page cache, but llama.cpp repacks the Q4_K experts into its own
    memory) and each stream count's timed steps are split into `rounds` alternating slices, so that a slow
    or fast phase of the machine falls on both columns alike."""
    from moeserve import LLM

    top, per = max(streams), -(-tokens // rounds)
    max_len = prompt_len + warmup + 2 * rounds * per + 8
    ours: dict[int, float] = {}
    theirs: dict[int, float] = {}
    llm = LLM(path, kernels=kernels, max_model_len=max_len, batch_invariant=batch_invariant)
    peer = load_llama(path) if with_llama and rounds > 1 else None
    for n in streams:
        ours[n], tb = _interleaved(llm, peer, n, top, prompt_len, max_len, per, rounds, warmup, threads, profile)
        if tb:
            theirs[n] = tb
    del llm
    gc.collect()
    if with_llama and rounds == 1:
        peer = load_llama(path)
        if peer:
            for n in streams:
                b = LlamaStreams(*peer, n, prompt_len, tokens, warmup, threads)
                theirs[n] = n * tokens / (dt := b.run(tokens))
                _report("llama.cpp", n, theirs[n], dt / tokens)
                b.close()
    if peer:
        peer[0].llama_model_free(peer[1])
    return ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (default: a tiny random model, smoke test only)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per stream count")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", default=None, choices=["auto", "cpu", "reference", "fast"])
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp column")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    ap.add_argument("--profile", action="store_true", help="print moeserve's per-stage time of one batched step")
    ap.add_argument("--rounds", type=int, default=1,
                    help="split the timed steps into this many alternating moeserve / llama.cpp slices, both engines "
                         "loaded (default 1: one engine after the other)")
    ap.add_argument("--batch-invariant", action="store_true", default=None,
                    help="moeserve's row-invariant kernels (LLM(batch_invariant=True))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moeserve.testing import smoke_model

    path = args.model or smoke_model("throughput")

    ours, theirs = bench(path, args.streams, args.prompt_len, args.tokens, args.warmup, args.threads, args.kernels,
                         not args.no_llama, args.rounds, args.profile, args.batch_invariant)

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
