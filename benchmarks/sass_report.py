"""What the triton backend's kernels cost on an H100, measured without one: compile them for sm_90 and read the SASS.

    python benchmarks/sass_report.py /tmp/qwen3-30b-a3b-4l.gguf          # decode T=1 and T=16 steps
    python benchmarks/sass_report.py FILE --tokens 1 --json out.json

Triton ships `ptxas` and `cuobjdump`, so a kernel compiles to an H100 binary on a machine with no GPU. The
script runs one forward of the model through the triton backend under Triton's interpreter with every kernel
launch recorded and *skipped* (so it is quick, and the outputs are garbage), then, in a second process
without the interpreter, compiles each distinct launch — the same argument types, 16-byte divisibility
specialisations, constexprs, warps and stages the runtime would use — for `cuda:90` and reports:

* registers per thread, local-memory stack (spills), shared memory: occupancy and spills;
* each loop's body (a backward branch in the SASS): instructions, global loads and their widths;
* for the quantized matrix kernels, warp instructions issued per weight in the K loop. An H100 (SXM) issues
  about 132 SMs x 4 x 1.98 GHz = 1.05e12 warp instructions/s and streams 3.35e12 bytes/s, so a kernel that
  reads Q4_K weights (0.5625 bytes each) at full bandwidth may spend at most ~0.18 warp instructions per
  weight; above that it is bound by instruction issue, not memory (`bound_by_issue` = the share of peak
  bandwidth it can reach at best).
* type conversions in the K loop (I2F, F2F, F2FP, F2I): sm_90 converts 16 values per clock per SM, an eighth of
  its issue rate of 4 warp instructions (CUDA guide, arithmetic instruction throughput: "all other type
  conversions"), so a loop is held to max(instructions, 8 x conversions) issue slots; `bound_by_issue` uses
  that.

It is a static proxy: it says nothing of latency, caches or launch gaps, and the device's triton version may
generate different code. Timings come from `benchmarks/gpu_bench.py` on the device.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

H100_WARP_INSTR_PER_S = 132 * 4 * 1.98e9
CONVERSION_COST = 8  # issue slots a warp's type conversion occupies on sm_90 (16 per clock per SM, not 128)
CONVERSIONS = {"I2F", "I2FP", "F2F", "F2FP", "F2I", "F2IP", "I2I", "I2IP"}
H100_BYTES_PER_S = 3.35e12

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# --------------------------------------------------------------------------------------------
# 1. record the launches of one forward (interpreter, kernels skipped)
# --------------------------------------------------------------------------------------------


LAUNCHES: dict[int, int] = {}
"""Triton launches per recorded phase (-1: the prefills; n: the decode step of n rows)."""


def _arg_spec(value: Any) -> tuple[str, Any, bool]:
    """(type, constexpr value or None, divisible by 16) of one runtime argument, as the JIT specialises it."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype).removeprefix("torch.")], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    if value is None:
        return "constexpr", None, False
    raise TypeError(f"argument {value!r} of type {type(value)}")


def record(path: str, tokens: list[int], attention_splits: int | None = None, prompt_len: int = 8) -> list[dict]:
    """Every distinct kernel launch of a prefill of `prompt_len` tokens per sequence and one decode step of `tokens`
    rows (`attention_splits`: force the decode attention's key splits, which off a GPU are never chosen)."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    from moeserve import LLM, SamplingParams

    seen: dict[str, dict] = {}
    phase = {"rows": 0}

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202
        fn = self.fn
        params = inspect.signature(fn).parameters
        names = list(params)
        constexpr_names = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        launch = {"module": fn.__module__, "kernel": fn.__name__, "num_warps": kwargs.pop("num_warps", 4),
                  "num_stages": kwargs.pop("num_stages", 3), "signature": {}, "constexprs": {}, "divisible": []}
        values = dict(zip(names, args, strict=False)) | kwargs
        for n in names:
            if n not in values:  # a default
                values[n] = params[n].default
            v = values[n]
            if n in constexpr_names:
                launch["signature"][n] = "constexpr"
                launch["constexprs"][n] = v
                continue
            t, c, div = _arg_spec(v)
            launch["signature"][n] = t
            if t == "constexpr":
                launch["constexprs"][n] = c
            elif div:
                launch["divisible"].append(n)
        key = json.dumps([launch[k] for k in ("module", "kernel", "num_warps", "num_stages", "signature",
                                              "constexprs", "divisible")], sort_keys=True)
        g = grid(values) if callable(grid) else grid
        LAUNCHES[phase["rows"]] = LAUNCHES.get(phase["rows"], 0) + 1
        entry = seen.setdefault(key, launch | {"grid": list(g), "rows": []})
        entry["calls"] = entry.get("calls", 0) + 1
        if phase["rows"] not in entry["rows"]:
            entry["rows"].append(phase["rows"])

    InterpretedFunction.run = run
    from moeserve.kernels.triton import pdl, qmatmul

    qmatmul._sm_count = lambda device: 132  # an H100's SMs: split-K as the GPU would choose it
    pdl._capable = lambda device: True  # and the kernels' programmatic-dependent-launch prologue, as on sm_90
    llm = LLM(path, device="cpu", kernels="triton", warmup=False, max_model_len=max(256, 2 * prompt_len),
              enforce_eager=True, max_num_seqs=max(tokens), max_num_batched_tokens=max(512, prompt_len))
    engine = llm.engine
    if attention_splits:
        for block in llm.model.blocks:
            block.attn.attn.splits = attention_splits
    for n in tokens:
        for i in range(n):
            engine.add_request([1 + i] + [2 + j % 50 for j in range(prompt_len - 1)],
                               SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        phase["rows"] = -1  # prefill launches
        engine.step()
        phase["rows"] = n
        while engine.has_unfinished():
            engine.step()
    del torch
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# 2. compile each launch for sm_90 and read its SASS
# --------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def loops(sass: str) -> list[dict]:
    """Each innermost-first loop (a backward branch): its body's size and global loads by width."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2)))
    index = {a: i for i, (a, _) in enumerate(ins)}
    out = []
    for i, (a, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if not m or int(m.group(1), 16) >= a or int(m.group(1), 16) not in index:
            continue
        body = [t for _, t in ins[index[int(m.group(1), 16)]:i + 1]]
        ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)
        loads = Counter(op for op in ops.elements() if op.startswith("LDG"))
        out.append({"instructions": len(body), "ldg": dict(loads), "spill_ld_st": ops.get("LDL", 0) + ops.get("STL", 0)
                    + sum(v for k, v in ops.items() if k.startswith(("LDL.", "STL."))),
                    "conversions": sum(v for k, v in ops.items() if k.split(".")[0] in CONVERSIONS),
                    "top": Counter(k.split(".")[0] for k in ops.elements()).most_common(8)})
    return out


_MEMORY_OPS = ("LDG", "STG", "ATOMG", "ATOM", "RED", "LDGSTS")  # global; local memory (spills) is per thread


def waits_before_memory(sass: str) -> bool | None:
    """With the PDL prologue (`moeserve.kernels.triton.pdl`): whether `griddepcontrol.wait` (ACQBULK) comes before
    the first global memory instruction, so that nothing overlaps the previous kernel. None without it."""
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if not m:
            continue
        if m.group(1) == "ACQBULK":
            return True
        if m.group(1).startswith(_MEMORY_OPS):
            return False if "ACQBULK" in sass else None
    return None


def weights_per_iteration(launch: dict) -> int | None:
    """Weights one program consumes per trip of its K loop, for the quantized matrix kernels (else None)."""
    c = launch["constexprs"]
    if not {"SH", "GPI"} <= set(c):
        return None
    rows = c.get("BLOCK_N", 0) * (2 if launch["kernel"].startswith("_gate_up") else 1)
    return c["GPI"] * 2 * c["SH"] * rows


def compile_report(launches: list[dict], keep: str | None = None) -> list[dict]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for n, launch in enumerate(launches):
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        names = fn.arg_names
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in launch["divisible"]}
        src = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"], attrs=attrs)
        row = {k: launch[k] for k in ("kernel", "rows", "grid", "num_warps", "num_stages", "constexprs")}
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
        except Exception as exc:  # report it and go on with the other kernels
            out.append(row | {"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(k.asm["cubin"])
            usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                                  check=True).stdout
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            Path(keep, f"{launch.get('index', n):02d}_{launch['kernel']}.sass").write_text(sass)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
        row |= {"regs": int(m[1]), "stack": int(m[2]), "shared": int(m[3]), "loops": loops(sass),
                "pdl_waits_first": waits_before_memory(sass)}
        w = weights_per_iteration(launch)
        if w and row["loops"]:
            main = max(row["loops"], key=lambda lp: lp["instructions"])
            per_weight = main["instructions"] * launch["num_warps"] / w
            slots = max(main["instructions"], CONVERSION_COST * main["conversions"]) * launch["num_warps"] / w
            budget = H100_WARP_INSTR_PER_S / (H100_BYTES_PER_S / 0.5625)
            row |= {"warp_instr_per_weight": per_weight, "issue_slots_per_weight": slots,
                    "bound_by_issue": min(1.0, budget / slots)}
        out.append(row)
    return out


def compile_in_processes(path: str, launches: list[dict], jobs: int, keep: str | None) -> list[dict]:
    """`compile_report` of the launches in `jobs` processes without the interpreter (each compile is one busy core:
    LLVM, then ptxas), shard j taking launches j, j + jobs, ...; the rows in the launches' order."""
    jobs = max(1, min(jobs, len(launches)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    indexed = [lc | {"index": n} for n, lc in enumerate(launches)]  # --keep-sass names files by the launch's index
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for j in range(jobs):
            shard = Path(tmp, f"launches{j}.json")
            shard.write_text(json.dumps(indexed[j::jobs]))
            cmd = [sys.executable, __file__, path, "--launches", str(shard)] + (["--keep-sass", keep] if keep else [])
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            sys.exit(f"compiling failed:\n{err[-3000:]}")
    shards = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return [shards[n % jobs][n // jobs] for n in range(len(launches))]


def table(rows: list[dict]) -> str:
    lines = ["| kernel | rows | grid | warps | regs | stack | shared | main loop instr | conversions | "
             "LDG in loop | warp instr / weight | ≤ share of HBM peak |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['rows']} | {r['grid']} | {r['num_warps']} | {r['error']} |")
            continue
        main = max(r["loops"], key=lambda lp: lp["instructions"]) if r["loops"] else {}
        ldg = ", ".join(f"{k.removeprefix('LDG.E')or'32'}x{v}" for k, v in sorted(main.get("ldg", {}).items()))
        per = f"{r['warp_instr_per_weight']:.3f}" if "warp_instr_per_weight" in r else ""
        share = f"{r['bound_by_issue']:.0%}" if "bound_by_issue" in r else ""
        rows = "/".join("prefill" if n < 0 else str(n) for n in r["rows"])
        lines.append(f"| {r['kernel']} | {rows} | {r['grid']} | "
                     f"{r['num_warps']} | {r['regs']} | {r['stack']} | {r['shared']} | "
                     f"{main.get('instructions', '')} | {main.get('conversions', '')} | "
                     f"{ldg} | {per} | {share} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a GGUF file (e.g. the 4-layer Qwen3-30B-A3B-shaped one of make_qwen3_30b.py)")
    ap.add_argument("--tokens", type=int, nargs="*", default=[1, 16], help="decode rows per step to record")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--keep-sass", help="a folder for each kernel's SASS")
    ap.add_argument("--decode-only", action="store_true", help="leave out the prefill launches")
    ap.add_argument("--attention-splits", type=int, help="force this many key splits in decode attention")
    ap.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per sequence (512: prefill GEMMs)")
    ap.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                    help="compiling processes (default: one per CPU this process may run on)")
    ap.add_argument("--launches", help=argparse.SUPPRESS)  # internal: the recorded launches (second process)
    args = ap.parse_args()
    if args.launches:  # the compiling process: no interpreter here
        rows = compile_report(json.loads(Path(args.launches).read_text()), args.keep_sass)
        print(json.dumps(rows))
        return
    launches = record(args.path, args.tokens, args.attention_splits, args.prompt_len)
    if args.decode_only:
        launches = [lc for lc in launches if max(lc["rows"]) >= 0]
    rows = compile_in_processes(args.path, launches, args.jobs, args.keep_sass)
    print(table(rows))
    for n, count in sorted(LAUNCHES.items()):
        if n >= 0:
            print(f"decode step of {n} rows: {count} triton launches")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
