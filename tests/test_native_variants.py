"""The AVX-512 VNNI kernel variant against the AVX2 floor (build.VARIANTS): on a CPU with AVX512VNNI both are
built and run, each in its own subprocess (two libraries cannot register `torch.ops.moeserve` in one process),
on the same inputs. The integer kernels (the quantized matmuls for every type at m = 1 .. 70, the integer GEMM,
the fused MoE) must agree bit for bit: vpdpwssd computes the same int32 sums as pmaddwd + paddd, and the float
code around them is compiled with the same -ffp-contract=off. The float kernels (the float32 GEMM, dequant,
RMSNorm, decode attention) are held to float32 rounding. Skipped, with the reason, on a CPU without AVX512VNNI.
The AVX2-only selection (no AVX-512 flag on such a CPU) is checked everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeserve.kernels.cpu import build

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from moeserve.gguf.quants import random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.cpu import build, native
from moeserve.kernels.cpu.moe import make_moe

torch.set_num_threads(2)
path = build.load()
assert f"moeserve_ops_{sys.argv[2]}_" in path.name, path
ops = native.ops()
out = {}
gen = torch.Generator().manual_seed(0)
N, K = 96, 512
for qt in sorted(native.NATIVE_TYPES):
    raw = torch.from_numpy(random_quant_bytes(qt, (N, K), np.random.default_rng(int(qt))))
    lin = native.NativeLinear(PackedTensor("w", qt, (N, K), raw))
    for m in (1, 2, 3, 4, 5, 8, 16, 33, 64, 70):
        out[f"int/linear/{qt.name}/{m}"] = lin(torch.randn(m, K, generator=gen))
    x = torch.randn(9, K, generator=gen)
    if qt in native.KQUANTS:
        out[f"int/qgemm_i16/{qt.name}"] = ops.qgemm(x, raw, int(qt), K, "i16")
    out[f"float/qgemm_f32/{qt.name}"] = ops.qgemm(x, raw, int(qt), K, "f32")
    out[f"float/dequant/{qt.name}"] = ops.dequant_rows(raw, int(qt), K)
E, H, I = 8, 512, 256
for gt, dt in ((QT.Q4_K, QT.Q6_K), (QT.Q5_K, QT.Q8_0), (QT.Q3_K, QT.Q2_K), (QT.IQ4_XS, QT.IQ4_NL)):
    def stack(qt, shape, seed):
        raw = torch.from_numpy(random_quant_bytes(qt, shape, np.random.default_rng(seed)))
        return native.NativeExperts(PackedTensor("e", qt, shape, raw))
    moe = make_moe(stack(gt, (E, I, H), 1), stack(gt, (E, I, H), 2), stack(dt, (E, H, I), 3))
    for T in (1, 3):
        x = torch.randn(T, H, generator=gen)
        ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
        w = torch.rand(T, 2, generator=gen)
        out[f"int/moe/{gt.name}+{dt.name}/{T}"] = moe(x, w, ids)
x, wn = torch.randn(5, 512, generator=gen), torch.randn(512, generator=gen)
out["float/rms_norm"] = ops.rms_norm(x, wn, 1e-6)
q = torch.randn(2, 8, 64, generator=gen)
k, v = torch.randn(2, 40, 2, 64, generator=gen), torch.randn(2, 40, 2, 64, generator=gen)
out["float/attn_decode"] = native.attn_decode(q, k, v, torch.tensor([40, 17]))
torch.save(out, sys.argv[1])
"""


def _run(variant: str, dest: Path) -> dict[str, torch.Tensor]:
    env = {**os.environ, "MOESERVE_NATIVE_ISA": variant, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(dest), variant], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{variant}:\n{proc.stderr[-4000:]}"
    return torch.load(dest)


@pytest.mark.skipif(build.isa() != "avx512vnni", reason="CPU without AVX-512 F/BW/VL + VNNI: only the AVX2 variant "
                                                        "can run here")
def test_avx512vnni_variant_matches_avx2(tmp_path: Path) -> None:
    a = _run("avx2", tmp_path / "avx2.pt")
    b = _run("avx512vnni", tmp_path / "avx512vnni.pt")
    assert a.keys() == b.keys() and any(k.startswith("int/") for k in a)
    for name, ref in a.items():
        got = b[name]
        assert got.shape == ref.shape, name
        if name.startswith("int/"):
            assert torch.equal(got, ref), f"{name}: max |diff| {(got - ref).abs().max().item()}"
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_avx2_cpu_never_gets_avx512_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOESERVE_NATIVE_ISA", raising=False)
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: frozenset({"avx2", "fma", "f16c", "sse4_2"}))
    variant = build._variant(build.isa())
    assert variant == "avx2"
    assert not any("avx512" in f for f in build.VARIANTS[variant][1])
    monkeypatch.setenv("MOESERVE_NATIVE_ISA", "avx512vnni")
    with pytest.raises(build.NativeBuildError, match="lacks avx512"):
        build._variant(build.isa())


def test_isa_override(monkeypatch: pytest.MonkeyPatch) -> None:
    floor = {"avx2", "fma", "f16c"}
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: frozenset(floor | build.AVX512VNNI))
    monkeypatch.delenv("MOESERVE_NATIVE_ISA", raising=False)
    assert build._variant("avx512vnni") == ("avx512vnni" if "avx512vnni" in build.AUTO_VARIANTS else "avx2")
    monkeypatch.setenv("MOESERVE_NATIVE_ISA", "avx2")
    assert build._variant("avx512vnni") == "avx2"
    monkeypatch.setenv("MOESERVE_NATIVE_ISA", "avx512vnni")
    assert build._variant("avx512vnni") == "avx512vnni"
    monkeypatch.setenv("MOESERVE_NATIVE_ISA", "sse2")
    with pytest.raises(build.NativeBuildError, match="MOESERVE_NATIVE_ISA"):
        build._variant("avx512vnni")

