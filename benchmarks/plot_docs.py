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
TG = {"moeserve": [31.37, 6.03], "llama.cpp": [31.84, 5.32]}
PP = {"moeserve": [115.78, 6.30], "llama.cpp": [187.33, 11.15]}  # pp512 at 4 layers, pp128 at 48
STREAMS = [1, 4, 16]
AGG = {"moeserve": [30.3, 37.6, 43.4], "llama.cpp": [27.0, 43.3, 58.8]}


def main(path: str = "docs/benchmarks.png") -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, data, title, xs, xlabel in (
        (axes[0], TG, "generation (single stream)", LAYERS, "layers"),
        (axes[1], PP, "prompt processing", LAYERS, "layers"),
        (axes[2], AGG, "batched decode, 4-layer file", STREAMS, "concurrent streams"),
    ):
        for (name, ys), style in zip(data.items(), ("o-", "s--")):
            ax.plot(xs, ys, style, label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s")
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yscale("log" if ax is not axes[2] else "linear")
        ax.legend()
    fig.suptitle("Qwen3-30B-A3B-shaped Q4_K_M (random valid blocks), 2 threads, same file, same run — 2026-11-24")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
