"""Prefix caching: requests that share a prompt prefix (a system prompt) with the cache on and off.

    python benchmarks/prefix_cache_bench.py MODEL.gguf --requests 8 --prefix 512 --suffix 32 --tokens 8
    python benchmarks/prefix_cache_bench.py            # a tiny random model, as a smoke test

One request arrives first (it fills the cache, as the first user of a system prompt would), then the
other requests arrive together. Each engine is fresh. Printed: prompt tokens, prompt tokens actually
run through the model, the pool's prefix-cache queries and hits, the wall time from submission to
the last token, and whether the cached run produced exactly the uncached run's tokens (greedy).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def run(llm, prompts: list[list[int]], tokens: int, cache: bool) -> tuple[dict[str, float], list[list[int]]]:
    from moeserve import SamplingParams
    from moeserve.engine.engine import EngineConfig

    engine = llm.make_engine(EngineConfig(max_num_seqs=len(prompts), enable_prefix_caching=cache))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outs: dict[str, list[int]] = {}

    def drain(rids: list[str]) -> None:
        while any(r not in outs for r in rids):
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)

    t0 = time.perf_counter()
    first = engine.add_request(prompts[0], params)
    drain([first])
    rest = [engine.add_request(p, params) for p in prompts[1:]]
    drain(rest)
    dt = time.perf_counter() - t0
    s = engine.stats()
    return {"prompt": s.prompt_tokens, "computed": s.computed_prompt_tokens, "queries": s.pool.prefix_queries,
            "hits": s.pool.prefix_hits, "seconds": dt}, [outs[r] for r in [first, *rest]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF file (default: a tiny random model)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=512, help="shared prompt tokens")
    ap.add_argument("--suffix", type=int, default=32, help="distinct prompt tokens per request")
    ap.add_argument("--tokens", type=int, default=8, help="generated tokens per request")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moeserve import LLM
    from moeserve.testing import smoke_model

    path = args.model or smoke_model("prefix")
    llm = LLM(path, max_model_len=args.prefix + args.suffix + args.tokens + 16)
    rng = np.random.default_rng(0)
    hi = min(llm.config.vocab_size, 32000) - 8
    prefix = rng.integers(1, hi, args.prefix).tolist()
    prompts = [prefix + rng.integers(1, hi, args.suffix).tolist() for _ in range(args.requests)]
    off, ref = run(llm, prompts, args.tokens, cache=False)
    on, got = run(llm, prompts, args.tokens, cache=True)
    print(f"\n{args.requests} requests, shared prefix {args.prefix} + {args.suffix} distinct prompt tokens, "
          f"{args.tokens} generated each, {args.threads} threads")
    print("| prefix cache | prompt tokens | computed | prefix queries | hits | hit rate | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in (("off", off), ("on", on)):
        rate = r["hits"] / r["queries"] if r["queries"] else 0.0
        print(f"| {name} | {r['prompt']} | {r['computed']} | {r['queries']} | {r['hits']} | {100 * rate:.1f} % | "
              f"{r['seconds']:.2f} |")
    print(f"speed-up {off['seconds'] / on['seconds']:.2f}x; identical tokens: {got == ref}")


if __name__ == "__main__":
    main()
