"""Every triton kernel a forward launches compiles for an H100 (sm_90), checked on a machine without a GPU.

The interpreter runs kernels on CPU tensors but never compiles them, so a kernel that only the GPU compiler
rejects (a layout it cannot lower, a type it lacks) would pass every other test. `benchmarks/sass_report.py`
records each launch of a prefill and two decode steps — with the same argument types, specialisations and
constexprs — and compiles it with Triton's bundled ptxas for `cuda:90`. The model mixes every packed type
the kernels take, and decode attention is forced to split its keys (the GPU's long-context path). Launches are
recorded as on an H100 (132 SMs for the split-K choices, the PDL prologue on), and the SASS must show each
kernel waiting for its predecessor (ACQBULK) before its first global memory instruction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT

pytest.importorskip("triton")

from moeserve.testing import ModelSpec, write_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_every_kernel_compiles_for_sm90(tmp_path: Path) -> None:
    qtypes = {"*ffn_gate_inp*": QT.F32, "output.weight": QT.Q6_K,
              "blk.0.attn_v*": QT.Q6_K, "blk.0.attn_output*": QT.Q8_0, "blk.0.ffn_down_exps*": QT.Q5_K,
              "blk.0.ffn_gate_exps*": QT.Q3_K, "blk.0.ffn_up_exps*": QT.Q3_K, "blk.2.attn_output*": QT.Q2_K,
              # layer 1's float v keeps the separate QK-norm + RoPE kernel; layer 0 finishes its heads in the
              # epilogue of two products (Q4_K q|k, Q6_K v), layer 2 (all Q4_K) of one
              "blk.1.attn_v*": QT.F16, "blk.1.attn_[qk].*": QT.Q5_1, "blk.1.attn_output*": QT.Q4_0,
              "blk.1.ffn_gate_exps*": QT.Q5_0, "blk.1.ffn_up_exps*": QT.Q5_0, "blk.1.ffn_down_exps*": QT.Q4_1,
              # a BF16 file's experts (TF32 gate/up) and an F16 down, beside layer 2's Q4_K attention
              "blk.2.ffn_gate_exps*": QT.BF16, "blk.2.ffn_up_exps*": QT.BF16, "blk.2.ffn_down_exps*": QT.F16,
              # IQ4 experts, and an IQ4_NL o_proj beside layer 1's Q4_0 one (same shape: their SASS compares)
              "blk.3.attn_output*": QT.IQ4_NL, "blk.3.ffn_gate_exps*": QT.IQ4_XS, "blk.3.ffn_up_exps*": QT.IQ4_XS,
              "blk.3.ffn_down_exps*": QT.IQ4_NL}
    spec = ModelSpec(n_layers=4, hidden_size=256, vocab_size=512, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                     n_experts_used=4, expert_ffn=256, ffn=512, qtype=QT.Q4_K, qtypes=qtypes)
    path = write_model(tmp_path / "mixed.gguf", spec)
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/sass_report.py"), str(path), "--tokens", "1", "16",
                           # 16 prompts of 20 tokens at top-4: 1280 pairs, the tile routing kernels
                           "--attention-splits", "2", "--prompt-len", "20",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    failed = [(r["kernel"], r["constexprs"], r["error"]) for r in rows if "error" in r]
    assert not failed
    kernels = {r["kernel"] for r in rows}
    assert kernels >= {"_rms_norm_kernel", "_qmatmul_kernel", "_qkv_heads_kernel", "_qk_norm_rope_kernel",
                       "_dequant_kernel",
                       "_paged_attention_kernel", "_route_align_kernel",
                       "_router_route_align_kernel", "_route_tiles_kernel", "_scatter_tiles_kernel", "_gate_up_kernel",
                       "_down_kernel"}
    assert any(r["constexprs"].get("SPLITS", 1) > 1 for r in rows if r["kernel"] == "_paged_attention_kernel")
    # the k/v pool write rides on the q/k/v products' epilogue, or on the QK-norm + RoPE kernel
    for name in ("_qkv_heads_kernel", "_qk_norm_rope_kernel"):
        assert {r["constexprs"]["WRITE_KV"] for r in rows if r["kernel"] == name} == {True}
    # a one-row decode step leaves its norms to the q/k/v and routing launches (first layer: no residual add)
    for name, deltas in (("_qkv_heads_kernel", {False, True}), ("_router_route_align_kernel", {True})):
        assert {r["constexprs"]["HAS_DELTA"] for r in rows if r["kernel"] == name and r["constexprs"]["NORM"]} == deltas
    norms = {r["constexprs"]["HAS_DELTA"] for r in rows if r["kernel"] == "_rms_norm_kernel"}
    assert norms == {False, True}  # the plain norm and the fused residual add + norm
    qtypes_compiled = {r["constexprs"]["QTYPE"] for r in rows if "QTYPE" in r["constexprs"]}
    assert qtypes_compiled == {int(t) for t in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q2_K, QT.Q3_K,
                                                 QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS, QT.F16,
                                                 QT.BF16)}
    # no register spills
    assert all(r["stack"] == 0 for r in rows
               if r["kernel"] in ("_qmatmul_kernel", "_qkv_heads_kernel", "_gate_up_kernel", "_down_kernel"))
    # programmatic dependent launch: every kernel waits for the previous one before its first global memory access
    assert all(r["constexprs"]["PDL"] and r["pdl_waits_first"] for r in rows)


def _report(tmp_path: Path, spec: ModelSpec, *args: str) -> list[dict]:
    path = write_model(tmp_path / "model.gguf", spec)
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/sass_report.py"), str(path), *args,
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_dense_down_projection_compiles_wide_for_sm90(tmp_path: Path) -> None:
    """A dense FFN's down projection takes its SwiGLU input in float32 and multiplies in TF32 (`WIDE`): that
    variant of the matrix kernel compiles for decode rows, a batched-decode tile and a prefill tile, unspilled."""
    spec = ModelSpec(arch="qwen3", n_layers=1, hidden_size=256, vocab_size=512, n_heads=4, n_kv_heads=2,
                     head_dim=64, n_experts=0, ffn=512, qtype=QT.Q4_K, qtypes={"*ffn_down*": QT.Q6_K})
    rows = _report(tmp_path, spec, "--tokens", "1", "20", "--prompt-len", "300")
    assert not [(r["kernel"], r["error"]) for r in rows if "error" in r]
    wide = [r for r in rows if r["kernel"] == "_qmatmul_kernel" and r["constexprs"]["WIDE"]]
    assert {r["constexprs"]["BLOCK_M"] for r in wide} == {16, 64, 128}
    assert all(r["stack"] == 0 for r in wide)
