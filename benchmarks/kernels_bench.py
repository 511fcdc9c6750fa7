"""Micro-benchmark of the matmul kernels on packed GGUF weights: fast backends vs reference.

For each quant type at the Qwen3-30B-A3B expert shapes (768x2048 gate/up, 2048x768 down) and,
for Q6_K (and Q4_K), the lm_head shape (151936x2048), prints:

* m = 1: microseconds per call and GB/s of *file* bytes (weight bytes in the GGUF / time),
* m = 64 and 512: GFLOP/s (2 m N K / time),

for the `cpu` backend (the native kernels) and the `reference` path
(dequantize to float32 + matmul). It then measures the per-call Python overhead of a decode
expert matmul (768x2048 Q4_K, m = 1). Times are the best of several repetitions (wall clock,
`--threads` torch/OpenMP threads), so a busy machine shows up as slower, never faster; on a
machine shared with other jobs, `--threads 1 --cpu-time` gives numbers that do not depend on them.

    python benchmarks/kernels_bench.py [--threads 2] [--types Q4_K,Q6_K] [--no-lm-head] [--cpu-time]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from moeserve.gguf.quants import random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.select import select_backend

EXPERT_SHAPES = [(768, 2048), (2048, 768)]
LM_HEAD = (151936, 2048)
ALL_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


CLOCK = time.perf_counter


def best_time(fn: Callable[[], object], budget: float = 0.15, reps: int = 5) -> float:
    """Best mean seconds per call over `reps` batches sized to ~budget/reps seconds each."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, int(budget / reps / one))
    best = float("inf")
    for _ in range(reps):
        t0 = CLOCK()
        for _ in range(n):
            fn()
        best = min(best, (CLOCK() - t0) / n)
    return best


def bench_weight(qt: QT, shape: tuple[int, int], rows: list[int], backends: list[str]) -> list[str]:
    """Each backend's linear on one random weight: GB/s at m = 1 (decode), GFLOP/s at larger m."""
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(0)))
    w = PackedTensor("w", qt, shape, raw)
    n, k = shape
    lines = []
    for backend in backends:
        t0 = time.perf_counter()
        fn = select_backend(backend).linear(w)
        t_prep = time.perf_counter() - t0
        cells = []
        for m in rows:
            x = torch.randn(m, k)
            budget = 0.6 if shape == LM_HEAD else 0.15
            t = best_time(lambda x=x, fn=fn: fn(x), budget=budget, reps=3 if shape == LM_HEAD else 5)
            if m == 1:
                cells.append(f"m=1 {t * 1e6:9.1f} us {raw.numel() / t / 1e9:6.1f} GB/s")
            else:
                cells.append(f"m={m} {2 * m * n * k / t / 1e9:6.1f} GFLOP/s")
        lines.append(f"{qt.name:5s} {n:>6}x{k:<5} {backend:9s} prep {t_prep * 1e3:7.1f} ms | " + " | ".join(cells))
    return lines


def bench_overhead() -> list[str]:
    """Per-call cost of a decode expert matmul beyond the kernel itself (768x2048 Q4_K, m = 1): the
    cpu backend's Python object vs calling its torch operator directly."""
    qt, shape = QT.Q4_K, (8, 768, 2048)
    raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(0)))
    w = PackedTensor("w", qt, shape, raw)
    x = torch.randn(1, 2048)
    experts = select_backend("cpu").experts(w)
    t_call = best_time(lambda: experts(3, x), budget=0.3)
    op = torch.ops.moeserve.qmatmul
    t_op = best_time(lambda: op(x, raw, int(qt), 2048, 4, 3), budget=0.3)
    return [f"cpu experts(e, x): {t_call * 1e6:.1f} us/call; torch.ops.moeserve.qmatmul {t_op * 1e6:.1f} us -> "
            f"Python overhead {(t_call - t_op) * 1e6:.1f} us"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(ALL_TYPES))
    ap.add_argument("--rows", default="1,64,512")
    ap.add_argument("--no-lm-head", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU time (use with --threads 1 on a shared machine: immune to other processes)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    rows = [int(r) for r in args.rows.split(",")]
    backends = ["cpu"] + ([] if args.no_reference else ["reference"])
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{args.threads} threads, "
        f"load average {load:.2f} (other processes make every number slower), "
        f"clock: {'process CPU time' if args.cpu_time else 'wall'}"
    )
    print("GB/s = GGUF file bytes of the weight / time; GFLOP/s = 2 m N K / time\n")
    for name in args.types.split(","):
        qt = QT[name]
        for shape in EXPERT_SHAPES:
            for line in bench_weight(qt, shape, rows, backends):
                print(line, flush=True)
    if not args.no_lm_head:
        for name in ("Q6_K", "Q4_K"):
            for line in bench_weight(QT[name], LM_HEAD, [1, 64], ["cpu"]):
                print(line, flush=True)
    print()
    for line in bench_overhead():
        print(line)


if __name__ == "__main__":
    main()
