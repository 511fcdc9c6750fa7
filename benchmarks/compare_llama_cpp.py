"""moeserve vs llama.cpp on the same GGUF, same threads, in one run: pp and tg tokens/s and the ratio.

    python benchmarks/compare_llama_cpp.py /tmp/qwen3-30b-a3b-q4km.gguf -p 512 -n 128 -t 2 -r 3
    python benchmarks/compare_llama_cpp.py A.gguf B.gguf ... --plot docs/bench_layers.png

Each engine runs in its own subprocess (sequentially, never concurrently), so neither's memory or
threads disturb the other. llama.cpp is driven through llama-cpp-python's low-level API the way
llama-bench does it: pp = one llama_decode of n random tokens, tg = n single-token decodes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA_SNIPPET = r"""
import json, statistics, sys, time, resource
import numpy as np, llama_cpp
path, p, n, t, r = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.perf_counter()
ll = llama_cpp.Llama(model_path=path, n_ctx=max(p, n) + 16, n_batch=max(p, 1), n_ubatch=max(p, 1), n_threads=t,
                     n_threads_batch=t, verbose=False, use_mmap=True)
toks = np.random.default_rng(0).integers(0, ll.n_vocab(), max(p, 1)).tolist()
ll.eval(toks[:1]); ll.reset()
load_s = time.perf_counter() - t0
pp, tg = [], []
for _ in range(r):
    if p:
        ll.reset(); t1 = time.perf_counter(); ll.eval(toks); pp.append(p / (time.perf_counter() - t1))
    if n:
        ll.reset(); t1 = time.perf_counter()
        for i in range(n):
            ll.eval([toks[i % len(toks)]])
        tg.append(n / (time.perf_counter() - t1))
sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
print(json.dumps(dict(load_s=load_s, pp_tps=statistics.mean(pp) if pp else 0.0, pp_tps_sd=sd(pp),
                      tg_tps=statistics.mean(tg) if tg else 0.0, tg_tps_sd=sd(tg),
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2)))
"""

MOESERVE_SNIPPET = r"""
import json, sys
from moeserve.bench import run_bench
path, p, n, t, r = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(json.dumps(run_bench(path, p, n, t, r, progress=False).to_dict()))
"""


def evict(path: str) -> None:
    """Drop `path` from the page cache, so the next load reads it from disk (a cold start)."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:  # as root, also drop every clean page (catches pages fadvise leaves behind)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError:
        pass


def run(snippet: str, path: str, p: int, n: int, t: int, r: int, cold: bool = False) -> dict:
    if cold:
        evict(path)
    env_cmd = [sys.executable, "-c", snippet, path, str(p), str(n), str(t), str(r)]
    t0 = time.perf_counter()
    out = subprocess.run(env_cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed:\n{out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--plot", help="write a PNG of tokens/s per model (e.g. per layer count)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cold", action="store_true",
                    help="evict the file from the page cache before each engine: load = cold start to first token")
    args = ap.parse_args()
    rows = []
    print(f"# {time.strftime('%Y-%m-%d')}  threads={args.t}  pp{args.p} tg{args.n}  reps={args.r}")
    load = "cold start to first token s" if args.cold else "load s"
    print(f"| model | engine | pp t/s | tg t/s | {load} | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|")
    for m in args.models:
        ms = run(MOESERVE_SNIPPET, m, args.p, args.n, args.t, args.r, args.cold)
        lc = run(LLAMA_SNIPPET, m, args.p, args.n, args.t, args.r, args.cold)
        for name, res in (("moeserve", ms), ("llama.cpp", lc)):
            print(f"| {m} | {name} | {res['pp_tps']:.2f} ± {res['pp_tps_sd']:.2f} | {res['tg_tps']:.2f} ± "
                  f"{res['tg_tps_sd']:.2f} | {res['load_s']:.1f} | {res['peak_rss_gb']:.2f} |")
        pp_ratio = ms["pp_tps"] / lc["pp_tps"] if lc["pp_tps"] else float("nan")
        tg_ratio = ms["tg_tps"] / lc["tg_tps"] if lc["tg_tps"] else float("nan")
        load_ratio = ms["load_s"] / lc["load_s"] if lc["load_s"] else float("nan")
        print(f"| {m} | **ratio** | **{pp_ratio:.2f}x** | **{tg_ratio:.2f}x** | {load_ratio:.2f}x | |")
        rows.append(dict(model=m, moeserve=ms, llama_cpp=lc, pp_ratio=pp_ratio, tg_ratio=tg_ratio))
    if args.json:
        print(json.dumps(rows))
    if args.plot:
        plot(rows, args.plot, args)


def plot(rows: list[dict], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["model"].rsplit("/", 1)[-1].removesuffix(".gguf") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "pp_tps", f"prompt processing (pp{args.p})"),
                           (axes[1], "tg_tps", f"generation (tg{args.n})")):
        ax.plot(labels, [r["moeserve"][key] for r in rows], "o-", label="moeserve")
        ax.plot(labels, [r["llama_cpp"][key] for r in rows], "s--", label="llama.cpp")
        ax.set_title(title)
        ax.set_ylabel("tokens/s")
        ax.set_yscale("log")
        ax.legend()
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"Qwen3-30B-A3B-shaped Q4_K_M, {args.t} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
