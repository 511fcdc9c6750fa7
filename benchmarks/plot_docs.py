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
TG = {"moeserve": [44.99, 8.35], "llama.cpp": [44.27, 8.34]}  # tg128 at 4 layers, tg32 at 48
PP = {"moeserve": [263.77, 20.71], "llama.cpp": [283.06, 20.01]}  # pp512
STREAMS = [1, 4, 16]
AGG = {"moeserve": [46.2, 56.7, 81.5], "llama.cpp": [31.2, 57.4, 81.1]}  # 4-layer file
AGG48 = {"moeserve": [8.9, 9.6, 12.6], "llama.cpp": [6.0, 11.7, 13.8]}  # full-size file


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
