#!/usr/bin/env python
"""One process against 2 ranks on the same cores: throughput, weight bytes per rank, collective costs.

    python benchmarks/scaling.py /tmp/qwen3-30b-a3b-4l.gguf          # the 4-layer Qwen3-30B-A3B-shaped file
    python benchmarks/scaling.py                                     # a tiny random model, as a smoke test

Each configuration runs in its own fresh process, one after the other (never two at once):

* `1x2`: one process, 2 threads (the baseline);
* `tp`: 2 ranks x 1 thread, attention heads and every expert's FFN split (all-reduce after o_proj and MoE);
* `ep`: 2 ranks x 1 thread, attention replicated, whole experts per rank;
* `tp+ep`: 2 ranks x 1 thread, attention heads split, whole experts per rank.

For each: prefill of 512 tokens (tokens/s), decode with 1 and 16 streams (aggregate tokens/s over timed
steps once every stream has prefilled; greedy, distinct random prompts), the weight bytes each rank holds
and its peak RSS. Then, in the 2-rank group alone, the time of one all-reduce of [T, hidden] float32 (the
collective after o_proj and after the MoE block) for T = 1, 16 and 512, and the gather of the lm_head logits.
Prints a markdown table and, with --json, writes every number to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = {
    "1x2": dict(threads=2),
    "tp": dict(threads=2, tensor_parallel_size=2, expert_parallel=False),
    "ep": dict(threads=2, tensor_parallel_size=2, expert_parallel=True, split_attention=False),
    "tp+ep": dict(threads=2, tensor_parallel_size=2, expert_parallel=True),
}


def measure(model: str, cfg: dict, n_prompt: int, steps: int, kernels: str | None) -> dict:
    """Run in a child process: load, then pp, decode-1 and decode-16."""
    import numpy as np
    import torch
    from throughput_bench import MoeserveStreams

    from moeserve import LLM, SamplingParams

    cfg = dict(cfg)
    torch.set_num_threads(cfg.pop("threads"))  # with 2 ranks each gets half (LLM shares -t out)
    t0 = time.perf_counter()
    llm = LLM(model, kernels=kernels, max_model_len=1024, max_num_batched_tokens=512, warmup=True, **cfg)
    load_s = time.perf_counter() - t0
    out: dict = {"load_s": round(load_s, 2), "rank_weight_bytes": llm.rank_weight_bytes,
                 "threads_per_rank": torch.get_num_threads(), "attention_split": llm.model.shard.attention_split}
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, min(llm.config.vocab_size, 32000) - 8, n_prompt).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.engine.allocator.reset_prefix_cache()
    pp = []
    for _ in range(3):
        llm.engine.allocator.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate([prompt], params)
        pp.append(n_prompt / (time.perf_counter() - t))
    out["pp_tps"] = max(pp)
    for n, temperature, key in ((1, 0.0, "decode1"), (16, 0.0, "decode16"), (16, 0.8, "decode16_sampled")):
        streams = MoeserveStreams(llm, n, n, 16, 16 + 2 * steps + 8, 2 * steps, warmup=2, temperature=temperature)
        best = min(streams.run(steps) for _ in range(2))
        out[f"{key}_tps"] = n * steps / best
        streams.close()
    llm.close()
    out["rank0_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["children_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return out


def _collective_worker(rank: int, port: int, hidden: int, vocab: int, q) -> None:  # noqa: ANN001
    import torch
    import torch.distributed as dist

    from moeserve.model.parallel import wait_collective

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for T in (1, 16, 512):
        x = torch.randn(T, hidden)
        for _ in range(20):
            dist.all_reduce(x)
        reps = 200 if T < 512 else 50
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        res[f"all_reduce_T{T}_us"] = (time.perf_counter() - t) / reps * 1e6
        res[f"all_reduce_T{T}_bytes"] = x.numel() * 4
        if T < 512:  # as the forward waits for it: polled with the core yielded (model.parallel.wait_collective)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(reps):
                wait_collective(dist.all_reduce(x, async_op=True), x)
            res[f"all_reduce_polled_T{T}_us"] = (time.perf_counter() - t) / reps * 1e6
            res[f"all_reduce_polled_T{T}_bytes"] = x.numel() * 4
    for T in (1, 16):
        x = torch.randn(T, vocab // 2)
        parts = [torch.empty_like(x) for _ in range(2)] if rank == 0 else None
        dist.barrier()
        t = time.perf_counter()
        for _ in range(100):
            dist.gather(x, parts, dst=0)
        res[f"gather_logits_T{T}_us"] = (time.perf_counter() - t) / 100 * 1e6
        res[f"gather_logits_T{T}_bytes"] = x.numel() * 4
        best = torch.randn(T, 2)  # a plain greedy step: each rank's best (logit, token) per row
        pairs = [torch.empty_like(best) for _ in range(2)] if rank == 0 else None
        dist.barrier()
        t = time.perf_counter()
        for _ in range(100):
            wait_collective(dist.gather(best, pairs, dst=0, async_op=True), best)
        res[f"gather_argmax_T{T}_us"] = (time.perf_counter() - t) / 100 * 1e6
        res[f"gather_argmax_T{T}_bytes"] = best.numel() * 4
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def collectives(hidden: int, vocab: int) -> dict:
    import torch.multiprocessing as mp

    from moeserve.engine.distributed import free_port

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_collective_worker, args=(r, port, hidden, vocab, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=300)
    for p in procs:
        p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one configuration, in this fresh process
        print(json.dumps(measure(args.model, CONFIGS[args.child], args.n_prompt, args.steps, args.kernels)))
        return
    model = args.model
    if model is None:
        from moeserve.testing import ModelSpec, write_model

        model = str(write_model(Path(tempfile.mkdtemp()) / "tiny.gguf",
                                ModelSpec(n_layers=2, hidden_size=256, n_experts=16, n_experts_used=4)))
    from moeserve.gguf.config import load_config
    from moeserve.gguf.reader import GGUFFile
    from moeserve.kernels.cpu.build import cpu_name

    f = GGUFFile(model)
    c = load_config(f)
    results: dict = {"model": model, "n_prompt": args.n_prompt, "file_bytes": f.total_bytes(), "cpu": cpu_name(),
                     "cores": len(os.sched_getaffinity(0)), "configs": {}}
    for name in args.configs:
        cmd = [sys.executable, __file__, model, "--child", name, "-p", str(args.n_prompt), "--steps", str(args.steps)]
        if args.kernels:
            cmd += ["--kernels", args.kernels]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results["configs"][name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name}: {results['configs'][name]}", file=sys.stderr, flush=True)
    results["collectives"] = collectives(c.hidden_size, c.vocab_size)
    print(table(results, c))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def table(r: dict, c) -> str:  # noqa: ANN001
    base = r["configs"].get("1x2")
    rows = [f"model: {Path(r['model']).name} ({r['file_bytes'] / 1e9:.2f} GB of weights), CPU: {r['cpu']}, "
            f"{r['cores']} cores", "",
            f"| config | pp{r['n_prompt']} t/s | decode 1 t/s | decode 16 t/s | decode16 vs 1x2 | decode 16 sampled "
            "t/s | sampled vs 1x2 | weight GB per rank | max rank / 1x2 |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, x in r["configs"].items():
        gb = " / ".join(f"{b / 1e9:.3f}" for b in x["rank_weight_bytes"])
        ratio = x["decode16_tps"] / base["decode16_tps"] if base else float("nan")
        sampled = x["decode16_sampled_tps"] / base["decode16_sampled_tps"] if base else float("nan")
        mem = max(x["rank_weight_bytes"]) / max(base["rank_weight_bytes"]) if base else float("nan")
        rows.append(f"| {name} | {x['pp_tps']:.1f} | {x['decode1_tps']:.2f} | {x['decode16_tps']:.2f} | "
                    f"{ratio:.2f}x | {x['decode16_sampled_tps']:.2f} | {sampled:.2f}x | {gb} | {mem:.2f} |")
    col = r["collectives"]
    rows += ["", f"collectives (gloo, 2 ranks x 1 thread, hidden {c.hidden_size}, vocab {c.vocab_size}):", "",
             "| collective | rows T | bytes | time µs |", "|---|---:|---:|---:|"]
    named = [("all_reduce [T, hidden] f32, blocking", "all_reduce", (1, 16, 512)),
             ("all_reduce [T, hidden] f32, polled (as the forward waits)", "all_reduce_polled", (1, 16)),
             ("gather logits [T, vocab/2] f32", "gather_logits", (1, 16)),
             ("gather best (logit, token) [T, 2] f32, polled", "gather_argmax", (1, 16))]
    for label, key, ts in named:
        for T in ts:
            rows.append(f"| {label} | {T} | {col[f'{key}_T{T}_bytes']:,} | {col[f'{key}_T{T}_us']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
