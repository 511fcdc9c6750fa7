"""Build and load the native CPU kernels (`csrc/`) as torch operators, `torch.ops.moeserve.*`.

The C kernel families (`quant.c`, `moe.c`, `attention.c`, `small.c`, gathered into one translation
unit by `kernels.c` so that gcc inlines across them as it did in the single file they came from) are
compiled by the C compiler (`$MOESERVE_NATIVE_CC`, `$CC` or `gcc`) with the flags in `C_FLAGS`;
`ops.cpp`, which registers them with `TORCH_LIBRARY(moeserve, ...)`, by the C++ compiler
(`$MOESERVE_NATIVE_CXX`, `$CXX` or `g++`) against torch's headers; both are linked into one shared
library against libc10 / libtorch / libtorch_cpu. The two compilations run in parallel.

The library goes to a per-machine cache (`$MOESERVE_CACHE`, default `~/.cache/moeserve`) under a
name keyed by a hash of every source file, the flags, the compilers' versions, the ISA variant and
the torch version and ABI, so a change to any of them rebuilds. It is written to a temporary file
and renamed into place: processes building or loading at the same time never see half a library.
`load()` builds (when needed) and loads it once per process, under a lock.

No silent fallback: a failed build raises `NativeBuildError` with the compiler's command and
output; a CPU without the floor features (AVX2, FMA, F16C) raises `NativeBuildError` naming the
missing ones (`MOESERVE_KERNELS=reference` runs without native kernels).

ISA: `cpu_features()` reads the CPU's flags from /proc/cpuinfo and `isa()` names the best level
the kernels know of: "avx2" (the floor) or "avx512vnni" (AVX-512 F/BW/VL + VNNI). `_variant()` picks the
variant built for it (`VARIANTS`: C sources and flags): "avx2" on an AVX2-only CPU, always (no AVX-512 flag
reaches its compile), and "avx512vnni" on an AVX512VNNI CPU, because it measured faster (`AUTO_VARIANTS`).
The "avx512vnni" variant is the same sources with `AVX512_FLAGS` added: they enable the `MOESERVE_VNNI` paths
(common.h `madd_add`, the integer GEMM micro-kernel `ukernel_i16`), vpdpwssd instead of pmaddwd + paddd,
with exactly the same int32 sums, and let gcc use EVEX encodings and 32 vector registers; -ffp-contract=off
stays, so its results equal the AVX2 variant's (tests/test_native_variants.py). Measured on a 2-thread
Xeon (AVX-512 VNNI) against the AVX2 variant, interleaved: Q4_K/Q6_K matmuls at the expert shapes
+10-19 % at m = 1, +11-17 % at m = 4, +20-27 % at m = 16-64; Qwen3-30B-A3B (4 layers, Q4_K_M)
pp512 +15-25 %, tg64 +2-13 %.

`$MOESERVE_NATIVE_ISA` overrides the choice: "avx2" forces the floor variant on any CPU (to compare, or to
rule the AVX-512 build out); "avx512vnni" forces that one (NativeBuildError on a CPU without it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from moeserve.errors import NativeBuildError

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
FLOOR = frozenset({"avx2", "fma", "f16c"})
AVX512VNNI = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})

C_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fPIC", "-fvisibility=hidden"]
"""The flags the single native.c of earlier versions was built with, plus -fvisibility=hidden: the kernels'
helper symbols (quant_row, pick_dot, ...) stay inside the library instead of interposing with other libraries'."""

CXX_FLAGS = ["-O2", "-std=c++20", "-fPIC"]
"""ops.cpp (argument checks and dispatch glue). C++20: torch >= 2.10's headers use C++20 features
(torch.utils.cpp_extension builds with -std=c++20 too)."""

AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
"""Added to C_FLAGS for the "avx512vnni" variant (only ever on a CPU with all of AVX512VNNI)."""

VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx2": (("kernels.c",), tuple(C_FLAGS)),
    "avx512vnni": (("kernels.c",), (*C_FLAGS, *AVX512_FLAGS)),
}
"""ISA variant -> (C sources, C flags)."""

AUTO_VARIANTS: frozenset[str] = frozenset({"avx512vnni"})
"""The variants above the floor that `_variant` selects on its own for a CPU that has them: only those that
measured faster than the AVX2 one (see `_variant`)."""

CXX_SOURCES = ("ops.cpp",)

_LOCK = threading.Lock()
_loaded: Path | None = None
last_build_seconds: float | None = None
"""Wall time of this process's last compile + link (None if it found the library in the cache)."""


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (benchmarks say which CPU gave each number)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def cpu_features() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them ('avx2', 'fma', 'avx512_vnni', ...); empty
    where there is no /proc/cpuinfo."""
    return set(_cpuinfo_flags())


def missing_features() -> set[str]:
    """The floor features (AVX2, FMA, F16C) this CPU lacks: empty when the native kernels can run."""
    return set(FLOOR - _cpuinfo_flags())


def cpu_ok() -> bool:
    return not missing_features()


def isa() -> str | None:
    """The best instruction-set level of this CPU the kernels know of: "avx512vnni", "avx2", or None
    below the floor."""
    flags = _cpuinfo_flags()
    if not FLOOR <= flags:
        return None
    return "avx512vnni" if AVX512VNNI <= flags else "avx2"


def _variant(level: str | None) -> str:
    """The kernel variant built for an ISA level: `$MOESERVE_NATIVE_ISA` when set ("avx2" forces the floor on any
    CPU; "avx512vnni" forces that variant, NativeBuildError on a CPU without AVX512VNNI), else `level` where it is
    in `AUTO_VARIANTS` (measured faster), else "avx2". An AVX2-only CPU always gets "avx2"."""
    if level is None:
        raise NativeBuildError(_floor_message())
    forced = os.environ.get("MOESERVE_NATIVE_ISA", "").strip().lower()
    if forced:
        if forced not in VARIANTS:
            raise NativeBuildError(f"MOESERVE_NATIVE_ISA={forced!r}: expected one of {', '.join(VARIANTS)}")
        if forced == "avx512vnni" and level != "avx512vnni":
            missing = ", ".join(sorted(AVX512VNNI - _cpuinfo_flags()))
            raise NativeBuildError(f"MOESERVE_NATIVE_ISA=avx512vnni: this CPU lacks {missing}")
        return forced
    return level if level in AUTO_VARIANTS else "avx2"


def _floor_message() -> str:
    missing = ", ".join(sorted(missing_features())) or "?"
    return (f"the native CPU kernels need AVX2, FMA and F16C; this CPU lacks {missing}. "
            "Set MOESERVE_KERNELS=reference to run without native kernels.")


def cache_dir() -> Path:
    return Path(os.environ.get("MOESERVE_CACHE", Path.home() / ".cache" / "moeserve"))


def compilers() -> tuple[str, str]:
    """(C compiler, C++ compiler) as named by the environment (not yet resolved on PATH)."""
    cc = os.environ.get("MOESERVE_NATIVE_CC") or os.environ.get("CC") or "gcc"
    cxx = os.environ.get("MOESERVE_NATIVE_CXX") or os.environ.get("CXX") or "g++"
    return cc, cxx


def _which(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NativeBuildError(f"no {what} '{name}' found to build the native CPU kernels (set MOESERVE_NATIVE_CC / "
                               "CC or MOESERVE_NATIVE_CXX / CXX, or run with MOESERVE_KERNELS=reference)")
    return path


@functools.cache
def _version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"cannot run the compiler '{compiler} --version': {exc}") from None
    return out.stdout.strip().split("\n", 1)[0]


def _torch_flags() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension

    abi = int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))
    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()
    link = [*(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch", "-ltorch_cpu"]
    return [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *inc], link


def _key(src_dir: Path, variant: str, cc: str, cxx: str, cxx_flags: list[str], link: list[str]) -> str:
    h = hashlib.sha256()
    for f in sorted(src_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    c_sources, c_flags = VARIANTS[variant]
    parts = [variant, *c_sources, *c_flags, *CXX_FLAGS, *cxx_flags, *link, cc, _version(cc), cxx, _version(cxx),
             torch.__version__, str(torch.version.git_version)]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:20]


def _run_all(jobs: list[list[str]], cwd: Path) -> None:
    """Run the compiler commands, up to one per core at a time; on the first failure stop the others and
    raise NativeBuildError with the failed command and its output."""
    pending, running = list(jobs), []
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    try:
        while pending or running:
            while pending and len(running) < workers:
                cmd = pending.pop(0)
                out = tempfile.TemporaryFile(dir=cwd)
                try:
                    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
                except OSError as exc:
                    out.close()
                    raise NativeBuildError(f"cannot run the compiler:\n$ {' '.join(cmd)}\n{exc}") from None
                running.append((cmd, proc, out))
            time.sleep(0.01)
            for item in list(running):
                cmd, proc, out = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                out.seek(0)
                text = out.read().decode(errors="replace")
                out.close()
                if proc.returncode:
                    raise NativeBuildError(f"building the native CPU kernels failed (exit status {proc.returncode}):\n"
                                           f"$ {' '.join(cmd)}\n{text}")
    finally:
        for _, proc, out in running:
            proc.kill()
            proc.wait()
            out.close()


def build(src_dir: Path | str = CSRC, cache: Path | str | None = None, *, cc: str | None = None,
          cxx: str | None = None, variant: str | None = None) -> Path:
    """Compile and link the kernel library from `src_dir` into `cache` (default `cache_dir()`), unless a library
    with the same key is already there; returns its path. Does not load it. `variant` (a key of VARIANTS)
    overrides `_variant(isa())`; the library is only loadable on a CPU that has its ISA. Raises NativeBuildError."""
    global last_build_seconds
    src_dir = Path(src_dir)
    out_dir = Path(cache) if cache is not None else cache_dir()
    if variant is None:
        variant = _variant(isa())
    elif variant not in VARIANTS:
        raise NativeBuildError(f"unknown native kernel variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    env_cc, env_cxx = compilers()
    cc, cxx = _which(cc or env_cc, "C compiler"), _which(cxx or env_cxx, "C++ compiler")
    cxx_flags, link = _torch_flags()
    path = out_dir / f"moeserve_ops_{variant}_{_key(src_dir, variant, cc, cxx, cxx_flags, link)}.so"
    if path.is_file():
        return path
    c_sources, c_flags = VARIANTS[variant]
    t0 = time.perf_counter()
    log.info("compiling the native CPU kernels into %s", path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
            tmp_dir = Path(tmp)
            jobs, objects = [], []
            for name in (*CXX_SOURCES, *c_sources):  # ops.cpp first: the longest compile
                src, obj = src_dir / name, tmp_dir / (name + ".o")
                if name.endswith(".cpp"):
                    jobs.append([cxx, *CXX_FLAGS, *cxx_flags, "-c", str(src), "-o", str(obj)])
                else:
                    jobs.append([cc, *c_flags, "-c", str(src), "-o", str(obj)])
                objects.append(str(obj))
            _run_all(jobs, tmp_dir)
            tmp_so = tmp_dir / path.name
            _run_all([[cxx, "-shared", "-fopenmp", *objects, "-o", str(tmp_so), *link]], tmp_dir)
            os.replace(tmp_so, path)  # atomic: concurrent loaders never see a half-written library
    except OSError as exc:
        raise NativeBuildError(f"cannot build the native CPU kernels in {out_dir}: {exc} (set MOESERVE_CACHE to a "
                               "writable directory)") from None
    last_build_seconds = time.perf_counter() - t0
    log.info("built the native CPU kernels in %.1f s", last_build_seconds)
    return path


def load() -> Path:
    """Build (if needed) and load the kernel library once per process, registering `torch.ops.moeserve.*`;
    returns its path. Thread-safe and idempotent. Raises NativeBuildError."""
    global _loaded
    with _LOCK:
        if _loaded is None:
            if not cpu_ok():
                raise NativeBuildError(_floor_message())
            path = build()
            try:
                torch.ops.load_library(str(path))
            except (OSError, RuntimeError) as exc:
                raise NativeBuildError(f"loading the native CPU kernels {path} failed: {exc}") from None
            _loaded = path
        return _loaded
