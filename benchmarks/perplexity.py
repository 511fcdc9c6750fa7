#!/usr/bin/env python
"""Perplexity of a GGUF model on held-out text, under moeserve and under llama.cpp.

    python benchmarks/perplexity.py                       # embedded model, its held-out text
    python benchmarks/perplexity.py model.gguf --text notes.txt --ctx 512

Both engines score the *same token ids* (moeserve's tokenization of the file, which must equal
llama.cpp's; the benchmark reports whether it does) in the same windows: the text is cut into
non-overlapping windows of `--ctx` tokens and every token but the first of each window is
predicted from the tokens before it in that window (teacher forcing, one forward per window).
perplexity = exp(mean negative log-likelihood).

The llama.cpp column needs `llama-cpp-python`; without it the column is skipped with a message.
`--json` prints one JSON object on the last line (used by scripts/train_tiny_moe.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moeserve.engine.llm import default_model_path  # noqa: E402

DEFAULT_TEXT = ROOT / "moeserve" / "data" / "tiny-moe-heldout.txt"


def windows(ids: list[int], ctx: int, limit: int | None) -> list[list[int]]:
    out = [ids[s:s + ctx] for s in range(0, len(ids), ctx)]
    out = [w for w in out if len(w) >= 2]
    return out[:limit] if limit else out


def nll_of(logits: np.ndarray, window: list[int]) -> float:
    """Sum over positions 0..n-2 of -log p(window[i+1] | window[:i+1])."""
    x = logits[: len(window) - 1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    target = x[np.arange(len(window) - 1), window[1:]]
    return float((logz - target).sum())


def summarise(total: float, n: int, seconds: float) -> dict:
    return {"loss": total / n, "perplexity": math.exp(total / n), "tokens_scored": n, "seconds": round(seconds, 2)}


def run_moeserve(model: str, wins: list[list[int]], ctx: int, kernels: str | None) -> dict:
    from moeserve import LLM

    llm = LLM(model, max_model_len=max(ctx, 2), kernels=kernels, warmup=False)
    t0, total, n = time.perf_counter(), 0.0, 0
    for w in wins:
        total += nll_of(llm.logits(w), w)
        n += len(w) - 1
    return summarise(total, n, time.perf_counter() - t0)


def run_llama_cpp(model: str, text: str, ids: list[int], wins: list[list[int]], ctx: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                          n_threads=threads, n_threads_batch=threads)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    same = theirs == ids
    t0, total, n = time.perf_counter(), 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w)
        total += nll_of(np.asarray(llm.scores[: len(w)], dtype=np.float32), w)
        n += len(w) - 1
    result = summarise(total, n, time.perf_counter() - t0)
    result["same_tokenization"] = same
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description="Perplexity of a GGUF under moeserve and llama.cpp.")
    ap.add_argument("model", nargs="?", default=None, help="GGUF file (default: the embedded model)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="held-out text file")
    ap.add_argument("--ctx", type=int, default=256, help="window length in tokens")
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--kernels", default=None, help="moeserve kernels: auto | cpu | reference")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--no-llama", action="store_true", help="skip the llama.cpp column")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args()

    model = args.model or default_model_path()
    if not Path(model).is_file():
        sys.exit(f"error: {model}: no such file")
    if not args.text.is_file():
        sys.exit(f"error: {args.text}: no such file")
    text = args.text.read_text(encoding="utf-8")

    from moeserve.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(model).encode(text, add_special_tokens=False)
    wins = windows(ids, args.ctx, args.max_windows)
    result: dict = {"model": str(model), "text": str(args.text), "text_tokens": len(ids), "ctx": args.ctx,
                    "windows": len(wins)}
    result["moeserve"] = run_moeserve(model, wins, args.ctx, args.kernels)

    note = None
    if args.no_llama:
        note = "skipped (--no-llama)"
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            note = f"skipped: llama_cpp is not importable ({exc}); pip install llama-cpp-python"
    result["llama_cpp"] = None if note else run_llama_cpp(model, text, ids, wins, args.ctx, args.threads)

    print(f"model  {model}\ntext   {args.text} ({len(ids)} tokens, {len(wins)} windows of {args.ctx})")
    print(f"{'engine':<10} {'perplexity':>10} {'loss':>7} {'scored':>7} {'seconds':>8}")
    for name in ("moeserve", "llama_cpp"):
        r = result[name]
        if r is None:
            print(f"{name:<10} {note}")
        else:
            print(f"{name:<10} {r['perplexity']:>10.3f} {r['loss']:>7.4f} {r['tokens_scored']:>7} {r['seconds']:>8.1f}")
    if result["llama_cpp"] is not None and not result["llama_cpp"]["same_tokenization"]:
        print("note: llama.cpp tokenizes the text differently; both engines scored moeserve's token ids")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
