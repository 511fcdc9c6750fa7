"""Two moeserve checkouts and llama.cpp on the same GGUF, interleaved in one run: did a change cost speed?

    git worktree add /tmp/base <old-commit>
    python benchmarks/ab_compare.py /tmp/qwen3-30b-a3b-4l.gguf --base /tmp/base -p 512 -n 128 -r 3 --rounds 2

Each round runs this checkout ("new"), llama.cpp and the other checkout ("base") one after the other, each
in its own subprocess (`compare_llama_cpp.py`'s snippets; the base's `moeserve` comes first on its
PYTHONPATH), so the VM's slow and fast phases fall on all three alike. It prints every run and the
new/base and moeserve/llama.cpp ratios of each round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llama_cpp import LLAMA_SNIPPET, MOESERVE_SNIPPET, evict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(snippet: str, checkout: Path, model: str, args: argparse.Namespace) -> dict:
    import json

    if args.cold:
        evict(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", snippet, model, str(args.p), str(args.n), str(args.t), str(args.r)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    if out.returncode != 0:
        raise SystemExit(f"benchmark subprocess failed ({checkout}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--base", required=True, help="the other checkout (e.g. a git worktree of the old commit)")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="evict the file from the page cache before each engine")
    ap.add_argument("--base-first", action="store_true", help="run the base checkout first in each round")
    args = ap.parse_args()
    base = Path(args.base).resolve()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.model}  threads={args.t}  pp{args.p} tg{args.n}  reps={args.r}")
    load = "cold start s" if args.cold else "load s"
    print(f"| round | engine | pp t/s | tg t/s | {load} | peak RSS GB |")
    print("|---|---|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {k: [] for k in ("pp new/base", "tg new/base", "pp new/llama", "tg new/llama",
                                                       "pp base/llama", "tg base/llama")}
    for i in range(1, args.rounds + 1):
        order = ["base", "llama.cpp", "new"] if args.base_first else ["new", "llama.cpp", "base"]
        where = {"new": (MOESERVE_SNIPPET, ROOT), "llama.cpp": (LLAMA_SNIPPET, ROOT), "base": (MOESERVE_SNIPPET, base)}
        res = {name: run(*where[name], args.model, args) for name in order}
        for name, r in res.items():
            print(f"| {i} | {name} | {r['pp_tps']:.2f} ± {r['pp_tps_sd']:.2f} | {r['tg_tps']:.2f} ± "
                  f"{r['tg_tps_sd']:.2f} | {r['load_s']:.1f} | {r['peak_rss_gb']:.2f} |", flush=True)
        for a, b in (("new", "base"), ("new", "llama.cpp"), ("base", "llama.cpp")):
            for key in ("pp", "tg"):
                ratios[f"{key} {a}/{b.split('.')[0]}"].append(res[a][f"{key}_tps"] / res[b][f"{key}_tps"])
    print("\n| ratio | " + " | ".join(f"round {i}" for i in range(1, args.rounds + 1)) + " | median |")
    print("|---|" + "---:|" * (args.rounds + 1))
    for k, v in ratios.items():
        print(f"| {k} | " + " | ".join(f"{x:.3f}" for x in v) + f" | **{statistics.median(v):.3f}** |")


if __name__ == "__main__":
    main()
