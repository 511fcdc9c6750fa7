"""Draw docs/benchmarks.png from the tables in docs/benchmarks.md (measured 2026-11-24; batched: 11-25).

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
AGG = {"moeserve": [38.5, 56.6, 95.3], "llama.cpp": [38.1, 51.9, 69.3]}  # 4-layer, session 4, --rounds 4 (run 1)
AGG48 = {"moeserve": [6.6, 8.7, 12.1], "llama.cpp": [5.8, 7.2, 11.7]}  # full-size file, session 4


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
    fig.suptitle("Qwen3-30B-A3B-shaped Q4_K_M (random valid blocks), 2 threads, same file, same run — 2026-11-24/25")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
