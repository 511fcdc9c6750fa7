"""The GPU benchmark: moeserve's triton backend against HF transformers bf16, same run, one script.

    python benchmarks/gpu_bench.py --out /tmp/gpu_bench.json          # on a GPU machine, unattended, < 8 min
    bash benchmarks/gpu_run.sh                                         # the same as one `device` call (carry .whl)
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --smoke          # the script's own check, on a CPU

What it does, in order (each phase is timed, guarded and reported even when another fails):

1. starts writing the full 48-layer Qwen3-30B-A3B-shaped Q4_K_M file (`make_qwen3_30b.py`) in the background;
2. writes the 4-layer file of the same shapes;
3. parity: small random models (MoE Q4_K/Q6_K, MoE Q8_0/Q5_K/Q4_0, dense qwen3 Q5_0/Q4_1, MoE with BF16/F16
   experts, MoE Q3_K/Q2_K) on the GPU through the triton backend against the reference backend on the CPU:
   max|Δlogits| / max|logits|, top-1 agreement, and 16 greedy tokens; then `wide_check`: activations past fp16's
   range into the MoE block and a dense down projection (finite, and their error against the float32 reference);
4. moeserve on the 4-layer file: load time, pp512, decode at 1 / 16 / 64 streams through the engine (what
   `LLM.generate` runs), peak GPU memory (weights, KV pool and activations), then a torch.profiler breakdown of
   a decode step (`decode_profile`: wall time, summed kernel time, kernels per step, the top kernels) and of
   one 512-token prefill (`prefill_profile`), and 16 greedy tokens of one stream with CUDA graphs and eager
   (`token_checks`: they should be equal); then `memory_check`: the KV pool sized from free memory
   (`gpu_memory_utilization` = what is in use + the file + 4 GB, `max_num_batched_tokens=8192`) and one
   8192-token prompt, whose peak must stay within that share of the GPU;
5. moeserve on the full 48-layer file: load, pp512, decode at 1 and 64 streams, peak memory, the decode
   profiles at 1 and 64 streams and of a 512-token prefill, and single-stream decode with session 12's fusions
   undone on the same model (`unfused_decode`: the norms as their own kernel, then also q/k/v finished by the
   separate kernel instead of the products' epilogue); then once more with
   programmatic dependent launch off (`MOESERVE_PDL=0`, `moeserve.kernels.triton.pdl`): pp512 and
   single-stream decode, the A/B of that prologue, whose greedy tokens must equal those with PDL on
   (`pdl_tokens_equal`; then the file is deleted);
6. HF transformers bf16 (sdpa) built from the same dequantized weights: pp512 and decode at 1 / 16 / 64 streams;
7. kernel timings (triton.testing.do_bench, eager, so host launch time included) of decode-size operations.
Phases 6 and 7 and the PDL-off run of phase 5 are skipped once the run is past `--budget` seconds.

Prints one table and writes everything as JSON (`--out`). Decode streams start from distinct random
64-token prompts and run greedy, so every stream routes to its own experts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, min(vocab, 32000) - 8, size=length).tolist() for _ in range(n)]


# --------------------------------------------------------------------------------------------
# moeserve
# --------------------------------------------------------------------------------------------


def start_streams(llm: Any, streams: int, prompt_len: int, max_tokens: int, seed: int, warm: int) -> Any:
    """`streams` greedy sequences of distinct random prompts in the engine, prefilled, then `warm` decode steps;
    returns the engine."""
    from moeserve import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for p in prompts(streams, prompt_len, llm.config.vocab_size, seed=seed):
        engine.add_request(p, params)
    running = engine.scheduler.running
    while len(running) < streams or any(s.num_computed < len(s.seq.prompt_ids) for s in running):
        engine.step()
        running = engine.scheduler.running
    for _ in range(warm):
        engine.step()
    return engine


def timed_steps(engine: Any, steps: int) -> float:
    """Seconds for `steps` engine steps, the device synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return time.perf_counter() - t0


def finish(engine: Any) -> None:
    while engine.has_unfinished():
        engine.step()


def moeserve_decode(llm: Any, streams: int, steps: int, prompt_len: int = 64, warm: int = 4) -> float:
    """Aggregate decode tokens/s of `streams` greedy sequences in one engine, prefill excluded."""
    engine = start_streams(llm, streams, prompt_len, warm + steps + 1, seed=streams, warm=warm)
    dt = timed_steps(engine, steps)
    finish(engine)
    return streams * steps / dt


def greedy_tokens(llm: Any, n: int = 16, prompt_len: int = 32) -> list[int]:
    """One stream's first `n` greedy tokens from a fixed random prompt, through the engine (a decode step of one
    sequence replays a CUDA graph when the runner captured them)."""
    from moeserve import SamplingParams

    p = prompts(1, prompt_len, llm.config.vocab_size, seed=11)[0]
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids)


def token_checks(llm: Any) -> dict:
    """The device's own consistency checks, seconds each: the greedy tokens of the step as run (CUDA graphs) and
    eager (the same model with the runner's graphs set aside). Compared across runs, the tokens also show that
    programmatic dependent launch changes no result (`48l` against `48l_nopdl`). Random weights can put two
    logits within a rounding of each other, so a difference late in the sequence is a hint, not a verdict."""
    out: dict[str, Any] = {"tokens": greedy_tokens(llm)}
    runner = llm.engine.runner
    if runner.graphs is not None:
        graphs, runner.graphs = runner.graphs, None
        try:
            eager = greedy_tokens(llm)
        finally:
            runner.graphs = graphs
        out["eager_equal"] = eager == out["tokens"]
        if not out["eager_equal"]:
            out["eager_tokens"] = eager
    log(f"greedy tokens {out['tokens']}; eager equal: {out.get('eager_equal', '(no graphs)')}")
    return out


def unfused_decode(llm: Any, steps: int, qkv_epilogue: bool) -> dict:
    """Single-stream decode with the decode fusions of session 12 undone on the same loaded model (one graph
    recaptured for one stream), then restored: the RMSNorms run as their own kernel instead of in the q/k/v and
    routing launches (`norm.PendingNorm`), and without `qkv_epilogue` the q/k/v heads are finished by the
    separate QK-norm + RoPE kernel after the products too (session 11's launches; `kernels/triton/qkv.py`)."""
    from moeserve.engine.cuda_graphs import DecodeGraphs

    norms = [n for b in llm.model.blocks for n in (b.attn_norm, b.ffn_norm) if getattr(n, "fuse", False)]
    qkvs = [] if qkv_epilogue else [b.attn.qkv for b in llm.model.blocks if getattr(b.attn.qkv, "weights", None)]
    saved = [(q, q.weights) for q in qkvs]
    runner = llm.engine.runner
    graphs = runner.graphs
    try:
        for n in norms:
            n.fuse = False
        for q in qkvs:
            q.weights = []
        if graphs is not None:
            runner.graphs = DecodeGraphs(runner.model, llm.engine.pool, 1)
            runner.graphs.capture()
        out = {"norms_unfused": len(norms), "qkv_separate": len(qkvs), "decode1": moeserve_decode(llm, 1, steps),
               "tokens": greedy_tokens(llm)}
    finally:
        for n in norms:
            n.fuse = True
        for q, w in saved:
            q.weights = w
        runner.graphs = graphs
    log(f"norms unfused ({out['norms_unfused']}), q/k/v by the separate kernel ({out['qkv_separate']} layers): "
        f"decode x1 {out['decode1']:.1f} t/s")
    return out


def device_profile(run: Callable[[], float], steps: int, label: str, top: int = 25) -> dict:
    """Where the device time of `run` (which returns its wall seconds for `steps` steps) goes, per step:
    torch.profiler's wall time, the kernels' summed device time ("busy"; the rest is launch gaps and host work),
    kernel count, and the `top` kernels by device time (CUDA-graph replays included: CUPTI traces the kernels
    inside them)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = run()
    kernels = []
    for e in prof.key_averages():
        # a kernel's own device time is its duration; a CPU op's self device time is 0 (its kernels are children)
        dev = getattr(e, "self_device_time_total", 0.0) if cuda else 0.0
        is_kernel = cuda and dev > 0
        if is_kernel or (not cuda and e.key.startswith("aten::")):  # off a GPU (--smoke): torch ops, CPU time
            kernels.append({"name": e.key[:90], "calls_per_step": e.count / steps,
                            "us_per_step": (dev if cuda else e.cpu_time_total) / steps})
    kernels.sort(key=lambda k: -k["us_per_step"])
    busy = sum(k["us_per_step"] for k in kernels)
    out = {"wall_us_per_step": wall / steps * 1e6, "busy_us_per_step": busy,
           "kernels_per_step": sum(k["calls_per_step"] for k in kernels), "top": kernels[:top]}
    log(f"profile {label}: {out['wall_us_per_step']:.0f} us/step wall (profiled), {busy:.0f} us kernels, "
        f"{out['kernels_per_step']:.0f} kernels/step")
    for k in kernels[:top]:
        log(f"  {k['us_per_step']:8.1f} us  x{k['calls_per_step']:5.1f}  {k['name']}")
    return out


def decode_profile(llm: Any, streams: int = 1, steps: int = 8, prompt_len: int = 16, top: int = 25) -> dict:
    """`device_profile` of `steps` engine decode steps of `streams` greedy sequences."""
    engine = start_streams(llm, streams, prompt_len, steps + 8, seed=streams + 1, warm=3)
    out = device_profile(lambda: timed_steps(engine, steps), steps, f"decode x{streams}", top)
    finish(engine)
    return {"streams": streams, **out}


def prefill_profile(llm: Any, n: int = 512, top: int = 25) -> dict:
    """`device_profile` of one n-token prefill (eager: prefill steps are not captured in graphs)."""
    moeserve_prefill(llm, n, reps=0)  # compiled and warm
    return {"tokens": n, **device_profile(lambda: _prefill_once(llm, n, seed=7), 1, f"prefill {n}", top)}


def _prefill_once(llm: Any, n: int, seed: int) -> float:
    """Seconds for one n-token prompt through the engine (one output token: the prefill alone)."""
    from moeserve import SamplingParams

    p = prompts(1, n, llm.config.vocab_size, seed=seed)[0]
    sync()
    t0 = time.perf_counter()
    llm.engine.add_request(p, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while llm.engine.has_unfinished():
        llm.engine.step()
    sync()
    return time.perf_counter() - t0


def moeserve_prefill(llm: Any, n: int, reps: int = 3) -> float:
    """Best n-token prefill tokens/s of `reps` runs after one that compiles (0 when reps is 0)."""
    times = [_prefill_once(llm, n, seed=100 + r) for r in range(reps + 1)][1:]
    return n / min(times) if times else 0.0


def bench_moeserve(path: str, streams: list[int], steps: int, label: str, enforce_eager: bool = False,
                   profile_streams: tuple[int, ...] = (), fusion_ab: bool = False) -> dict:
    """`_bench_moeserve`, falling back (so that a run still gives numbers) first to programmatic dependent launch
    off, then to eager decode; the result says which fallback it took."""
    try:
        return _bench_moeserve(path, streams, steps, label, enforce_eager, profile_streams, fusion_ab)
    except Exception:
        traceback.print_exc()
        if os.environ.get("MOESERVE_PDL") != "0":
            log(f"{label}: failed; again with programmatic dependent launch off")
            return {**without_pdl(lambda: bench_moeserve(path, streams, steps, label, enforce_eager,
                                                         profile_streams)), "pdl_failed": True}
        if enforce_eager:
            raise
        log(f"{label}: failed with CUDA graphs; again with --enforce-eager")
        return {**_bench_moeserve(path, streams, steps, label, True, profile_streams), "graphs_failed": True}


def _bench_moeserve(path: str, streams: list[int], steps: int, label: str, enforce_eager: bool,
                    profile_streams: tuple[int, ...] = (), fusion_ab: bool = False) -> dict:
    from moeserve import LLM

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    max_seqs = max(streams)
    t0 = time.perf_counter()
    llm = LLM(path, device="cuda", max_model_len=1024, max_num_seqs=max_seqs, max_num_batched_tokens=512,
              num_kv_blocks=max_seqs * 64, enforce_eager=enforce_eager)
    load_s = time.perf_counter() - t0
    log(f"{label}: loaded in {load_s:.1f} s ({llm.kernels} kernels, graphs: {llm.engine.runner.graphs is not None})")
    from moeserve.kernels.triton.pdl import pdl_enabled

    r: dict[str, Any] = {"load_s": load_s, "kernels": llm.kernels, "graphs": llm.engine.runner.graphs is not None,
                         "pdl": pdl_enabled(torch.device("cuda")),
                         "file_gb": os.path.getsize(path) / 1e9,
                         "kv_pool_gb": 2 * llm.engine.pool.k.numel() * llm.engine.pool.k.element_size() / 1e9}
    r["pp512"] = moeserve_prefill(llm, 512)
    log(f"{label}: pp512 {r['pp512']:.0f} t/s")
    for n in streams:
        r[f"decode{n}"] = moeserve_decode(llm, n, steps)
        log(f"{label}: decode x{n}: {r[f'decode{n}']:.1f} t/s")
    r["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    try:
        r.update(token_checks(llm))
    except Exception as exc:  # a check must not lose the timings
        traceback.print_exc()
        r["tokens_error"] = f"{type(exc).__name__}: {exc}"
    for key, qkv_epilogue in (("norms_unfused", True), ("qkv_separate", False)) if fusion_ab else ():
        try:
            r[key] = unfused_decode(llm, steps, qkv_epilogue)
            if "tokens" in r:
                r[key]["tokens_equal"] = r[key]["tokens"] == r["tokens"]
        except Exception as exc:
            traceback.print_exc()
            r[key] = {"error": f"{type(exc).__name__}: {exc}"}
    for n in profile_streams:  # after the timings and the peak: the profiler costs time, not device memory
        try:
            r[f"profile{n}"] = decode_profile(llm, n)
        except Exception as exc:  # a profiler problem must not lose the timings
            traceback.print_exc()
            r[f"profile{n}"] = {"error": f"{type(exc).__name__}: {exc}"}
    if profile_streams:
        try:
            r["profile_pp512"] = prefill_profile(llm, 512)
        except Exception as exc:
            traceback.print_exc()
            r["profile_pp512"] = {"error": f"{type(exc).__name__}: {exc}"}
    r["reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return r


def memory_check(path: str, batched: int = 8192, headroom: float = 4e9, device: str = "cuda") -> dict:
    """The KV pool sized from free memory (no explicit pool), and small enough that the budget, not
    `max_num_seqs` x context, decides it: `gpu_memory_utilization` is set to what is in use now plus the file plus
    `headroom` bytes. With `max_num_batched_tokens=batched` the profile run keeps one step's activations free, so
    a prompt of `batched` tokens, then decoding, must run within that share of the device (what
    `--gpu-memory-utilization` promises) instead of running out of memory."""
    from moeserve import LLM, SamplingParams
    from moeserve.engine.paged_cache import blocks_for

    gc.collect()
    cuda = device == "cuda"
    utilization = 0.9
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        utilization = min(0.95, round((total - free + os.path.getsize(path) + headroom) / total, 4))
    t0 = time.perf_counter()
    seqs, context = 64, 4 * batched  # the pool 64 full contexts want (8.6 GB on the 4-layer file) > the budget
    llm = LLM(path, device=device, max_model_len=context, max_num_seqs=seqs, max_num_batched_tokens=batched,
              gpu_memory_utilization=utilization, warmup=False, **({} if cuda else {"kernels": "triton"}))
    pool = llm.engine.pool
    r: dict[str, Any] = {"load_s": time.perf_counter() - t0, "batched_tokens": batched, "utilization": utilization,
                         "kv_blocks": pool.num_blocks, "kv_pool_gb": 2 * pool.k.numel() * pool.k.element_size() / 1e9,
                         "step_reserve_gb": (llm.engine.step_reserve or 0) / 1e9,
                         "pool_budget_limited": pool.num_blocks < seqs * blocks_for(context)}  # < what seqs fill
    ids = prompts(1, batched, llm.model.config.vocab_size, seed=5)[0]
    t0 = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    r["prefill_s"] = time.perf_counter() - t0
    if cuda:
        sync()
        free, total = torch.cuda.mem_get_info()
        outside = (total - free) - torch.cuda.memory_reserved()  # the CUDA context, other processes
        r["peak_used_gb"] = (outside + torch.cuda.max_memory_reserved()) / 1e9
        r["limit_gb"] = utilization * total / 1e9
        r["within_limit"] = r["peak_used_gb"] <= r["limit_gb"]
        log(f"memory: {batched}-token step, pool {r['kv_pool_gb']:.2f} GB, peak {r['peak_used_gb']:.2f} GB of "
            f"{r['limit_gb']:.2f} GB allowed")
    del llm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return r


# --------------------------------------------------------------------------------------------
# HF transformers
# --------------------------------------------------------------------------------------------


def bench_hf(path: str, streams: list[int], steps: int) -> dict:
    from moeserve.testing import hf_reference

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = hf_reference(path, device="cuda", dtype=torch.bfloat16, attn="sdpa")
    r: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    vocab = model.config.vocab_size
    with torch.inference_mode():
        ids = torch.tensor(prompts(1, 512, vocab, seed=7), device="cuda")
        for _ in range(2):
            model(ids)
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            model(ids)
        sync()
        r["pp512"] = 3 * 512 / (time.perf_counter() - t0)
        log(f"hf: pp512 {r['pp512']:.0f} t/s")
        for n in streams:
            ids = torch.tensor(prompts(n, 64, vocab, seed=n), device="cuda")
            kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
            sync()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **kw)
            sync()
            r[f"decode{n}"] = n * steps / (time.perf_counter() - t0)  # prefill of 64 tokens included (small)
            log(f"hf: decode x{n}: {r[f'decode{n}']:.1f} t/s")
    r["peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return r


# --------------------------------------------------------------------------------------------
# parity and kernels
# --------------------------------------------------------------------------------------------


def parity(tmp: Path, device: str, only: int | None = None) -> dict:
    """triton backend on `device` vs the reference backend on the CPU, small random models."""
    from gguf import GGMLQuantizationType as QT

    from moeserve import LLM, SamplingParams
    from moeserve.testing import ModelSpec, write_model

    cases = {
        "moe-q4k-q6k": dict(arch="qwen3moe", qtype=QT.Q4_K,
                            qtypes={"*ffn_down_exps*": QT.Q6_K, "output.weight": QT.Q6_K, "*ffn_gate_inp*": QT.F32}),
        "moe-q8_0-q5k": dict(arch="qwen3moe", qtype=QT.Q8_0, qtypes={"*ffn_down_exps*": QT.Q5_K,
                                                                   "*ffn_gate_inp*": QT.F32, "*attn_v*": QT.Q4_0}),
        "qwen3-q5_0-q4_1": dict(arch="qwen3", qtype=QT.Q5_0, qtypes={"*ffn_down*": QT.Q4_1}, n_experts=0),
        "moe-bf16-experts": dict(arch="qwen3moe", qtype=QT.Q8_0, qtypes={"*ffn_gate_exps*": QT.BF16,
                                 "*ffn_up_exps*": QT.BF16, "*ffn_down_exps*": QT.F16, "*ffn_gate_inp*": QT.F32}),
        "moe-q3k-q2k-iq4": dict(arch="qwen3moe", qtype=QT.Q3_K, qtypes={"*ffn_gate_exps*": QT.Q2_K,
                                "*ffn_up_exps*": QT.Q2_K, "*ffn_down_exps*": QT.IQ4_XS, "*attn_v*": QT.Q2_K,
                                "*attn_k*": QT.IQ4_NL, "output.weight": QT.Q6_K, "*ffn_gate_inp*": QT.F32}),
    }
    out = {}
    for name, kw in list(cases.items())[:only]:
        spec = ModelSpec(n_layers=2, hidden_size=256, vocab_size=512, n_heads=4, n_kv_heads=2, head_dim=64,
                         n_experts=kw.pop("n_experts", 8), n_experts_used=2, expert_ffn=256, ffn=512, **kw)
        path = write_model(tmp / f"{name}.gguf", spec)
        ref = LLM(str(path), kernels="reference", device="cpu", warmup=False)
        fast = LLM(str(path), device=device, kernels="triton", warmup=False)
        ids = prompts(1, 24, 512, seed=3)[0]
        a, b = ref.logits(ids), fast.logits(ids)
        err = float(np.abs(a - b).max() / np.abs(a).max())
        top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
        sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        ga = ref.generate([ids], sp)[0].outputs[0].token_ids
        gb = fast.generate([ids], sp)[0].outputs[0].token_ids
        out[name] = {"rel_err": err, "top1": top1, "greedy_equal": ga == gb, "kernels": fast.kernels}
        log(f"parity {name}: rel err {err:.2e}, top-1 {top1:.3f}, greedy 16 equal: {ga == gb}")
    return out


def wide_check(device: str) -> dict:
    """Activations past fp16's range into the down projections (real checkpoints' massive activations): the MoE
    block and a dense MLP's down product on `device` against the float32 reference on the CPU — finite, and
    max|Δ| / max|ref| (they were inf/NaN with fp16 operands)."""
    from gguf import GGMLQuantizationType as QT

    from moeserve.gguf.quants import random_quant_bytes
    from moeserve.gguf.reader import PackedTensor
    from moeserve.kernels.moe import GroupedMoE
    from moeserve.kernels.qlinear import ReferenceExperts, reference_matmul
    from moeserve.kernels.triton.fused_moe import TritonMoE
    from moeserve.kernels.triton.qmatmul import TritonLinear

    def weight(qt: QT, shape: tuple[int, ...], seed: int) -> PackedTensor:
        raw = random_quant_bytes(qt, shape, np.random.default_rng(seed), scale=shape[-1] ** -0.5)
        return PackedTensor(f"w{seed}", qt, shape, torch.from_numpy(raw))

    def on_device(w: PackedTensor) -> PackedTensor:
        return PackedTensor(w.name, w.qtype, w.shape, w.data.to(device))

    E, H, I = 8, 256, 256
    cpu = [weight(QT.F32, (E, H), 0), weight(QT.Q4_K, (E, I, H), 1), weight(QT.Q4_K, (E, I, H), 2),
           weight(QT.Q6_K, (E, H, I), 3)]
    fast = [on_device(w) for w in cpu]
    moe = TritonMoE(TritonLinear(fast[0]), *fast[1:], 2, True)
    ref = GroupedMoE(TritonLinear(cpu[0]), *(ReferenceExperts(w) for w in cpu[1:]), 2, True)
    out = {}
    for T in (1, 70):
        h = torch.randn(T, H, generator=torch.Generator().manual_seed(T)) * 3000
        a, b = moe(h.to(device)).cpu(), ref(h)
        out[f"moe T={T}"] = {"finite": bool(torch.isfinite(a).all()),
                             "rel_err": float((a - b).abs().max() / b.abs().max())}
    w = weight(QT.Q6_K, (512, 768), 4)
    lin = TritonLinear(on_device(w))
    lin.widen()
    for m in (1, 300):
        x = torch.randn(m, 768, generator=torch.Generator().manual_seed(m)) * 1e6
        a, b = lin(x.to(device)).cpu(), reference_matmul(x, w.data, w)
        out[f"down m={m}"] = {"finite": bool(torch.isfinite(a).all()),
                              "rel_err": float((a - b).abs().max() / b.abs().max())}
    for k, v in out.items():
        log(f"wide {k}: finite {v['finite']}, rel err {v['rel_err']:.2e}")
    return out


def kernel_timings(path: str) -> dict:
    """Microseconds of decode-size operations of the file (triton.testing.do_bench)."""
    import triton.testing

    from moeserve import LLM
    from moeserve.kernels.metadata import positions_metadata

    llm = LLM(path, device="cuda", max_model_len=256, max_num_seqs=1, num_kv_blocks=32, enforce_eager=True,
              warmup=False)
    m = llm.model
    blk = m.blocks[0]
    H = m.config.hidden_size
    out = {}
    for T in (1, 16, 64, 512):
        x = torch.randn(T, H, device="cuda")
        out[f"lm_head T={T}"] = triton.testing.do_bench(lambda x=x: m.lm_head(x)) * 1e3
        out[f"moe T={T}"] = triton.testing.do_bench(lambda x=x: blk.ffn(x)) * 1e3
        meta = positions_metadata(torch.arange(T, device="cuda"))  # no pool: q, k, v returned
        out[f"qkv T={T}"] = triton.testing.do_bench(lambda x=x, meta=meta: blk.attn.qkv(x, meta)) * 1e3
        out[f"rmsnorm T={T}"] = triton.testing.do_bench(lambda x=x: blk.attn_norm(x)) * 1e3
    for k, v in out.items():
        log(f"kernel {k}: {v:.1f} us")
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def without_pdl(run: Callable[[], dict]) -> dict:
    """`run()` with programmatic dependent launch off (the kernels' other specialisation, compiled anew)."""
    os.environ["MOESERVE_PDL"] = "0"
    try:
        return run()
    finally:
        os.environ.pop("MOESERVE_PDL", None)


def table(res: dict) -> str:
    rows = ["| | moeserve 4-layer | HF bf16 4-layer | ratio | moeserve 48-layer |", "|---|---:|---:|---:|---:|"]
    m, h, f = res.get("moeserve_4l", {}), res.get("hf_4l", {}), res.get("moeserve_48l", {})

    def cell(d: dict, k: str, fmt: str = "{:,.0f}") -> str:
        return fmt.format(d[k]) if k in d else "–"

    for k, name in (("pp512", "prompt 512, tokens/s"), ("decode1", "decode 1 stream, tokens/s"),
                    ("decode16", "decode 16 streams, tokens/s"), ("decode64", "decode 64 streams, tokens/s")):
        ratio = f"{m[k] / h[k]:.2f}x" if k in m and k in h else "–"
        rows.append(f"| {name} | {cell(m, k)} | {cell(h, k)} | {ratio} | {cell(f, k)} |")
    unf, sep = f.get("norms_unfused", {}), f.get("qkv_separate", {})
    rows.append(f"| decode 1 stream, norms unfused, tokens/s | | | | {cell(unf, 'decode1')} |")
    rows.append(f"| decode 1 stream, norms unfused + q/k/v separate, tokens/s | | | | {cell(sep, 'decode1')} |")
    off = res.get("48l_nopdl", {})
    for k, name in (("pp512", "prompt 512, PDL off"), ("decode1", "decode 1 stream, PDL off")):
        rows.append(f"| {name}, tokens/s | | | | {cell(off, k)} |")
    rows.append(f"| peak GPU memory, GB | {cell(m, 'peak_gb', '{:.2f}')} | {cell(h, 'peak_gb', '{:.2f}')} | | "
                f"{cell(f, 'peak_gb', '{:.2f}')} |")
    rows.append(f"| file + KV pool, GB | {m['file_gb'] + m['kv_pool_gb']:.2f} | | | "
                f"{f['file_gb'] + f['kv_pool_gb']:.2f} |" if "file_gb" in m and "file_gb" in f else
                "| file + KV pool, GB | | | | |")
    rows.append(f"| load, s | {cell(m, 'load_s', '{:.1f}')} | {cell(h, 'load_s', '{:.1f}')} | | "
                f"{cell(f, 'load_s', '{:.1f}')} |")
    checks = [f"{label} graphs = eager: {d['eager_equal']}" for label, d in (("4-layer", m), ("48-layer", f))
              if "eager_equal" in d]
    for name, d in (("norms unfused", unf), ("q/k/v separate", sep)):
        if "tokens_equal" in d:
            checks.append(f"48-layer fused = {name}: {d['tokens_equal']}")
    if "pdl_tokens_equal" in res:
        checks.append(f"48-layer PDL on = off: {res['pdl_tokens_equal']}")
    if checks:
        rows.append("\ngreedy tokens (16): " + "; ".join(checks))
    parity = [f"{name} {d['rel_err']:.1e} top-1 {d['top1']:.3f} greedy {d['greedy_equal']}"
              for name, d in res.get("parity", {}).items() if isinstance(d, dict) and "rel_err" in d]
    if parity:
        rows.append("parity vs CPU reference (max|Δ|/max|logits|): " + "; ".join(parity))
    mem = res.get("memory", {})
    if "peak_used_gb" in mem:
        rows.append(f"pool sized from free memory, one {mem['batched_tokens']}-token step: KV pool "
                    f"{mem['kv_pool_gb']:.2f} GB, {mem['step_reserve_gb']:.2f} GB kept for a step (profiled), "
                    f"peak {mem['peak_used_gb']:.2f} GB of {mem['limit_gb']:.2f} GB "
                    f"allowed ({mem['utilization']} of the GPU; pool limited by it: {mem['pool_budget_limited']})")
    wide = [f"{name} finite {d['finite']} {d['rel_err']:.1e}" for name, d in res.get("wide", {}).items()
            if isinstance(d, dict) and "finite" in d]
    if wide:
        rows.append("past fp16's range: " + "; ".join(wide))
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--dir", default=None, help="where the GGUF files go (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per stream count")
    ap.add_argument("--budget", type=float, default=400,
                    help="seconds after which the HF and kernel-timing phases (the last ones) are skipped")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["parity", "wide", "kernels", "4l", "memory", "hf", "48l", "48l_nopdl"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU + TRITON_INTERPRET=1: checks the script")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="gpu_bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    log(f"device {res['device']}, torch {res['torch']}, triton {res.get('triton')}")

    if args.smoke:
        res["parity"] = parity(tmp, "cpu", only=1)
        res["wide"] = wide_check("cpu")
        from moeserve import LLM

        llm = LLM(str(tmp / "moe-q4k-q6k.gguf"), device="cpu", kernels="triton", warmup=False)
        res["profile"] = decode_profile(llm, streams=1, steps=2, top=8)
        res["tokens"] = token_checks(llm)
        res["norms_unfused"] = unfused_decode(llm, 2, qkv_epilogue=True)
        res["qkv_separate"] = unfused_decode(llm, 2, qkv_epilogue=False)
        res["profile_prefill"] = prefill_profile(llm, 32, top=8)
        res["memory"] = memory_check(str(tmp / "moe-q4k-q6k.gguf"), batched=32, device="cpu")
        print(json.dumps(res, indent=1))
        return

    full = tmp / "qwen3-30b-a3b-q4km.gguf"
    small = tmp / "qwen3-30b-a3b-4l.gguf"
    writer = None
    if "48l" not in args.skip:
        writer = subprocess.Popen([sys.executable, str(ROOT / "benchmarks/make_qwen3_30b.py"), str(full)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if "4l" not in args.skip or "hf" not in args.skip or "kernels" not in args.skip:
        subprocess.run([sys.executable, str(ROOT / "benchmarks/make_qwen3_30b.py"), str(small), "--layers", "4"],
                       check=True, stdout=subprocess.DEVNULL)
        log(f"wrote {small} ({small.stat().st_size / 1e9:.2f} GB)")

    def phase(name: str, fn: Any) -> None:
        if name in args.skip:
            return
        try:
            res[name] = fn()
        except Exception as exc:  # one broken phase must not lose the others' numbers
            traceback.print_exc()
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{name} FAILED: {exc}")
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)

    def within_budget(name: str) -> bool:
        if time.perf_counter() - T0 > args.budget and name not in args.skip:
            args.skip.append(name)
            log(f"{name} phase skipped: past the time budget")
        return name not in args.skip

    # the figures the bars need first (the 48-layer decode was cut by the budget once), the HF
    # comparison next, the eager kernel timings (host-bound, the profiles say more) last
    phase("parity", lambda: parity(tmp, "cuda"))
    phase("wide", lambda: wide_check("cuda"))
    phase("4l", lambda: bench_moeserve(str(small), [1, 16, 64], args.steps, "moeserve 4-layer", profile_streams=(1,)))
    phase("memory", lambda: memory_check(str(small)))  # while the 48-layer file is still being written
    res["moeserve_4l"] = res.get("4l", {})
    if writer is not None:
        _, err = writer.communicate()
        if writer.returncode:
            log(f"writing the 48-layer file failed: {err.decode()[-2000:]}")
        else:
            log(f"wrote {full} ({full.stat().st_size / 1e9:.2f} GB)")
            phase("48l", lambda: bench_moeserve(str(full), [1, 64], args.steps, "moeserve 48-layer",
                                                profile_streams=(1, 64), fusion_ab=True))
            res["moeserve_48l"] = res.get("48l", {})
            if within_budget("48l_nopdl"):
                phase("48l_nopdl", lambda: without_pdl(lambda: bench_moeserve(str(full), [1], args.steps,
                                                                              "moeserve 48-layer, PDL off")))
                a, b = res.get("48l", {}).get("tokens"), res.get("48l_nopdl", {}).get("tokens")
                if a is not None and b is not None:
                    res["pdl_tokens_equal"] = a == b
                    log(f"48-layer greedy tokens, PDL on and off, equal: {a == b}")
            full.unlink()  # 18.6 GB of disk back before HF loads
    if within_budget("hf"):
        phase("hf", lambda: bench_hf(str(small), [1, 16, 64], min(args.steps, 32)))
    res["hf_4l"] = res.get("hf", {})
    if within_budget("kernels"):
        phase("kernels", lambda: kernel_timings(str(small)))
    res["total_s"] = time.perf_counter() - T0
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(table(res), flush=True)
    log("done")


if __name__ == "__main__":
    main()
