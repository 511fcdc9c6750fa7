"""A GGUF fuzzer: structure-aware mutations of a small valid model, each loaded and run in a forked child
with a time and a memory cap, outcomes counted by class.

    python -m tests.fuzz.gguf_fuzz --cases 10000 --seed 1      # the long run (`make fuzz`)

Mutation kinds: truncation, byte flips, string lengths, array item counts, header counts, n_dims, tensor
dimensions, quant types, tensor offsets, metadata value types and values, weight bytes set to NaN/inf
patterns, dropped and stray tensors. The child loads the file (`LLM(..., warmup=False)`), and if that
works runs `logits` and a 4-token greedy `generate`. Outcome classes:

* `clean`   — a `MoeServeError` (one clear message), the expected answer to a bad file;
* `success` — loaded and ran (NaN logits are allowed: a file may hold NaN weights);
* `foreign` — any other Python exception (a check we are missing);
* `signal`  — the child died by a signal (a crash);
* `hang`    — the child exceeded its time cap;
* `overcap` — the child exceeded its memory cap (MemoryError or a failed allocation).

Target: 0 foreign, 0 signal, 0 hang, 0 overcap.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import signal
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("truncate", "flip", "string_len", "array_count", "header_count", "n_dims", "dims", "qtype", "offset",
         "kv_value", "nan_weights", "tensor_set")
OUTCOMES = ("clean", "success", "foreign", "signal", "hang", "overcap")


@dataclass
class Layout:
    """Where the seed file's structural fields are (byte offsets)."""

    size: int
    kv_strings: list[int]  # offsets of u64 string lengths (keys and string values)
    arrays: list[tuple[int, int]]  # (offset of the u32 item type, offset of the u64 count)
    kv_types: list[int]  # offsets of the u32 value type of each key
    scalars: list[tuple[int, int]]  # (offset, byte size) of scalar values
    tensors: list[dict]  # name_len_at, ndims_at, dims_at, type_at, offset_at, data_at, nbytes


def seed_model(path: Path) -> Path:
    from gguf import GGMLQuantizationType as QT

    from moeserve.testing import ModelSpec, write_model

    spec = ModelSpec(n_layers=1, vocab_size=320, hidden_size=256, head_dim=64, n_heads=4, n_kv_heads=2, n_experts=4,
                     n_experts_used=2, expert_ffn=256, qtype=QT.Q4_K,
                     qtypes={"*attn_v*": QT.Q6_K, "*ffn_gate_inp*": QT.F32, "token_embd.weight": QT.Q8_0,
                             "output.weight": QT.Q5_0, "*down_exps*": QT.Q6_K}, context_length=256)
    return write_model(path, spec)


def layout(path: Path) -> Layout:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    kv_strings, arrays, kv_types, scalars = [], [], [], []
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        at = int(f.offset)
        kv_strings.append(at)
        type_at = at + 8 + len(key.encode())
        kv_types.append(type_at)
        vtype = int(f.types[0])
        if vtype == 9:
            arrays.append((type_at + 4, type_at + 8))
        elif vtype == 8:
            kv_strings.append(type_at + 4)
        else:
            scalars.append((type_at + 4, int(f.parts[-1].nbytes)))
    tensors = []
    for t in r.tensors:
        at = int(t.field.offset)
        n = len(t.name.encode())
        nd = len(t.shape)
        tensors.append(dict(name_len_at=at, ndims_at=at + 8 + n, dims_at=at + 12 + n, type_at=at + 12 + n + 8 * nd,
                            offset_at=at + 16 + n + 8 * nd, data_at=int(t.data_offset), nbytes=int(t.n_bytes),
                            name=t.name))
    return Layout(os.path.getsize(path), kv_strings, arrays, kv_types, scalars, tensors)


def _pick(rng: np.random.Generator, values: list[int]) -> int:
    """One of `values` (Python ints: numpy would turn 2**64 - 1 into a float)."""
    return values[int(rng.integers(len(values)))]


def _u64(rng: np.random.Generator) -> int:
    return _pick(rng, [0, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, int(rng.integers(0, 2**16)),
                       int(rng.integers(0, 2**63))])


def mutate(seed: bytes, lay: Layout, kind: str, rng: np.random.Generator) -> bytes:
    d = bytearray(seed)
    t = lay.tensors[int(rng.integers(len(lay.tensors)))]
    if kind == "truncate":
        return bytes(d[: int(rng.integers(0, len(d)))])
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            d[int(rng.integers(len(d)))] ^= 1 << int(rng.integers(8))
    elif kind == "string_len":
        struct.pack_into("<Q", d, _pick(rng, lay.kv_strings + [t["name_len_at"]]), _u64(rng))
    elif kind == "array_count":
        it, cnt = lay.arrays[int(rng.integers(len(lay.arrays)))]
        if rng.random() < 0.3:
            struct.pack_into("<I", d, it, int(rng.integers(0, 16)))
        struct.pack_into("<Q", d, cnt, _u64(rng))
    elif kind == "header_count":
        struct.pack_into("<Q", d, _pick(rng, [8, 16]), _u64(rng))
    elif kind == "n_dims":
        struct.pack_into("<I", d, t["ndims_at"], _pick(rng, [0, 1, 2, 3, 4, 5, 255, 2**32 - 1]))
    elif kind == "dims":
        nd = struct.unpack_from("<I", d, t["ndims_at"])[0]
        struct.pack_into("<Q", d, t["dims_at"] + 8 * int(rng.integers(max(nd, 1))), _u64(rng))
    elif kind == "qtype":
        struct.pack_into("<I", d, t["type_at"], _pick(rng, [0, 1, 2, 3, 6, 7, 8, 10, 12, 13, 14, 16, 30, 39, 255,
                                                            2**31]))
    elif kind == "offset":
        off = struct.unpack_from("<Q", d, t["offset_at"])[0]
        struct.pack_into("<Q", d, t["offset_at"], _pick(rng, [off + 1, off + 32, off - 32, 0, 2**64 - 32,
                                                              _u64(rng)]) % 2**64)
    elif kind == "kv_value":
        if rng.random() < 0.5:
            struct.pack_into("<I", d, _pick(rng, lay.kv_types), int(rng.integers(0, 14)))
        else:
            at, n = lay.scalars[int(rng.integers(len(lay.scalars)))]
            pat = _pick(rng, [b"\xff", b"\x00", b"\x7f", b"\x80"])
            d[at:at + n] = pat * n if rng.random() < 0.5 else rng.bytes(n)
    elif kind == "nan_weights":
        n = min(t["nbytes"], int(rng.integers(2, 4096)))
        start = t["data_at"] + int(rng.integers(0, max(1, t["nbytes"] - n)))
        d[start:start + n] = (_pick(rng, [b"\xff", b"\x7f", b"\x7c\x00", b"\x00\x7c", b"\xff\x7f"]) * n)[:n]
        d = d[: len(seed)]
    elif kind == "tensor_set":
        return _tensor_set(seed, rng)
    return bytes(d)


def _tensor_set(seed: bytes, rng: np.random.Generator) -> bytes:
    """Drop one tensor, or add a stray extra one (gguf-py refuses to write a duplicate name)."""
    from gguf import GGMLQuantizationType, GGUFReader

    from moeserve.testing import rewrite_gguf

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "s.gguf", Path(tmp) / "d.gguf"
        src.write_bytes(seed)
        names = [t.name for t in GGUFReader(str(src)).tensors]
        if rng.random() < 0.6:
            change: dict = {names[int(rng.integers(len(names)))]: None}
        else:
            name = names[int(rng.integers(len(names)))] + ".x" if rng.random() < 0.5 else "blk.7.attn_q.weight"
            change = {name: (np.zeros(64, dtype=np.float32), GGMLQuantizationType.F32)}
        return rewrite_gguf(src, dst, tensors=change).read_bytes()


def _child(path: str, kernels: str, mem_cap: int, time_cap: float, wfd: int) -> None:
    """Runs in the forked child: never returns."""
    code, detail = 0, ""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (mem_cap, mem_cap))
        signal.setitimer(signal.ITIMER_REAL, time_cap)
        import torch

        torch.set_num_threads(1)
        from moeserve import LLM, SamplingParams
        from moeserve.errors import MoeServeError

        try:
            llm = LLM(path, kernels=kernels, warmup=False, max_model_len=64)
            llm.logits([1, 2, 3])
            llm.generate([[1, 2]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            code = 0
        except MoeServeError as exc:
            code, detail = 1, str(exc)[:300]
        except MemoryError as exc:
            code, detail = 5, repr(exc)[:300]
        except Exception as exc:  # noqa: BLE001 - classifying is the point
            text = f"{type(exc).__name__}: {exc}"
            code, detail = (5 if "allocate" in text or "out of memory" in text else 2), text[:300]
    except BaseException as exc:  # noqa: BLE001
        code, detail = 2, f"{type(exc).__name__}: {exc}"[:300]
    try:
        os.write(wfd, detail.encode("utf-8", "replace")[:400])
    finally:
        os._exit(code)


def run_case(path: str, kernels: str, mem_cap: int, time_cap: float) -> tuple[str, str]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(path, kernels, mem_cap, time_cap, w)
    os.close(w)
    deadline = time.monotonic() + time_cap + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # the child ignored its own alarm
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            return "hang", "killed after the deadline"
        time.sleep(0.002)
    detail = os.read(r, 4096).decode("utf-8", "replace")
    os.close(r)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ("hang" if sig == signal.SIGALRM else "signal"), f"signal {sig}"
    code = os.WEXITSTATUS(status)
    return {0: "success", 1: "clean", 2: "foreign", 5: "overcap"}.get(code, "foreign"), detail


def fuzz(cases: int, seed: int = 0, kernels: str = "cpu", time_cap: float = 20.0, mem_extra: int = 1 << 30,
         workdir: str | None = None, log=None) -> dict:  # noqa: ANN001
    """Run `cases` mutations; returns counts per outcome and per (kind, outcome), and examples of bad outcomes."""
    import moeserve.engine.llm  # noqa: F401 - loaded once here, so every forked child runs the same code

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        seed_path = seed_model(Path(tmp) / "seed.gguf")
        seed_bytes = seed_path.read_bytes()
        lay = layout(seed_path)
        # the cap: what this process maps now (torch's libraries are large) plus `mem_extra`
        with open("/proc/self/statm") as f:
            vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        mem_cap = vsz + mem_extra
        counts: collections.Counter = collections.Counter()
        by_kind: collections.Counter = collections.Counter()
        examples: list[dict] = []
        case_path = str(Path(tmp) / "case.gguf")
        t0 = time.perf_counter()
        for i in range(cases):
            kind = KINDS[i % len(KINDS)]
            data = mutate(seed_bytes, lay, kind, rng)
            with open(case_path, "wb") as f:
                f.write(data)
            outcome, detail = run_case(case_path, kernels, mem_cap, time_cap)
            counts[outcome] += 1
            by_kind[(kind, outcome)] += 1
            if outcome not in ("clean", "success") and len(examples) < 20:
                keep = Path(tmp).parent / f"moeserve-fuzz-{seed}-{i}.gguf"
                keep.write_bytes(data)
                examples.append(dict(case=i, kind=kind, outcome=outcome, detail=detail, file=str(keep)))
            if log and (i + 1) % 500 == 0:
                log(f"{i + 1} cases, {time.perf_counter() - t0:.0f} s: {dict(counts)}")
        return dict(cases=cases, seconds=time.perf_counter() - t0, counts={o: counts[o] for o in OUTCOMES},
                    by_kind={f"{k}/{o}": n for (k, o), n in sorted(by_kind.items())}, examples=examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kernels", default="cpu")
    ap.add_argument("--time-cap", type=float, default=20.0)
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args()
    res = fuzz(args.cases, args.seed, args.kernels, args.time_cap, log=lambda s: print(s, flush=True))
    print(json.dumps({k: v for k, v in res.items() if k != "by_kind"}, indent=1))
    print(json.dumps(res["by_kind"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    bad = sum(res["counts"][o] for o in ("foreign", "signal", "hang", "overcap"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
