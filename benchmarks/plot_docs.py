"""Draw docs/benchmarks.png from the tables in docs/benchmarks.md (numbers measured 2026-11-24).

The numbers below are copied from the benchmark scripts' printed tables (compare_llama_cpp.py,
throughput_bench.py); re-run those scripts and update both places together.
"""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYERS = [4, 48]
TG = {"moeserve": [51.23, 9.46], "llama.cpp": [53.01, 8.63]}  # tg128 at 4 layers (run 1), tg32 at 48 (run D)
PP = {"moeserve": [267.41, 25.75], "llama.cpp": [304.86, 17.74]}  # pp512
STREAMS = [1, 4, 16]
AGG = {"moeserve": [52.5, 77.3, 99.9], "llama.cpp": [41.2, 69.0, 88.4]}  # 4-layer file, final code (first run)
AGG48 = {"moeserve": [8.1, 8.6, 13.7], "llama.cpp": [7.9, 8.8, 14.3]}  # full-size file, final code


def main(path: str = "docs/benchmarks.png") -> None:
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, data, title, xs, xlabel in (
        (axes[0], TG, "generation (single stream)", LAYERS, "layers"),
        (axes[1], PP, "prompt processing", LAYERS, "layers"),
        (axes[2], AGG, "batched decode, 4-layer file", STREAMS, "concurrent streams"),
        (axes[3], AGG48, "batched decode, full-size file", STREAMS, "concurrent streams"),
    ):
        for (name, ys), style in zip(data.items(), ("o-", "s--")):
            ax.plot(xs, ys, style, label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale("log" if ax in (axes[0], axes[1]) else "linear")
        ax.legend()
    fig.suptitle("Qwen3-30B-A3B-shaped Q4_K_M (random valid blocks), 2 threads, same file, same run — 2026-11-24")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
