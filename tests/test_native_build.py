"""Building the native CPU kernels fails loudly: a compiler error raises NativeBuildError carrying the
compiler's command and output (never a silent fallback, never None). The broken builds use a copy of the
sources in a temporary directory and a temporary cache: the real cache is not touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeserve.errors import MoeServeError, NativeBuildError
from moeserve.kernels.cpu import build


def _broken_copy(tmp_path: Path, name: str, bad_line: str) -> Path:
    src = tmp_path / "csrc"
    shutil.copytree(build.CSRC, src)
    f = src / name
    f.write_text(f.read_text() + "\n" + bad_line + "\n")
    return src


needs_floor = pytest.mark.skipif(not build.cpu_ok(), reason="CPU below the AVX2/FMA/F16C floor")


@needs_floor
def test_c_syntax_error_raises_with_compiler_output(tmp_path: Path) -> None:
    src = _broken_copy(tmp_path, "quant.c", "int moeserve_broken( { this is not C }")
    with pytest.raises(NativeBuildError) as info:
        build.build(src, tmp_path / "cache")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, MoeServeError)
    assert "quant.c" in msg and "error" in msg  # the compiler's own diagnostic ...
    assert "moeserve_broken" in msg
    assert "-mavx2" in msg and "-c" in msg  # ... and the command that produced it
    assert not any((tmp_path / "cache").glob("*.so"))  # nothing half-built is left for a loader


@needs_floor
def test_cpp_error_raises_with_compiler_output(tmp_path: Path) -> None:
    src = _broken_copy(tmp_path, "ops.cpp", "static_assert(false, \"moeserve deliberately broken\");")
    with pytest.raises(NativeBuildError, match="moeserve deliberately broken") as info:
        build.build(src, tmp_path / "cache")
    assert "ops.cpp" in str(info.value) and "-std=c++" in str(info.value)


@needs_floor
def test_missing_compiler_raises(tmp_path: Path) -> None:
    with pytest.raises(NativeBuildError, match="no C compiler 'moeserve-no-such-cc'"):
        build.build(build.CSRC, tmp_path / "cache", cc="moeserve-no-such-cc")


def test_cpu_below_the_floor_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: frozenset({"sse2", "avx", "fma"}))
    assert not build.cpu_ok() and build.isa() is None
    assert build.missing_features() == {"avx2", "f16c"}
    from moeserve.kernels.cpu import native

    assert not native.available()
    with pytest.raises(NativeBuildError, match="lacks avx2, f16c.*MOESERVE_KERNELS=reference"):
        build.build(build.CSRC, Path("/nonexistent"))


def test_isa_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOESERVE_NATIVE_ISA", raising=False)
    floor = {"avx2", "fma", "f16c"}
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: frozenset(floor))
    assert build.isa() == "avx2" and build._variant(build.isa()) == "avx2"
    monkeypatch.setattr(build, "_cpuinfo_flags",
                        lambda: frozenset(floor | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}))
    assert build.isa() == "avx512vnni" and build._variant(build.isa()) == "avx512vnni"  # measured faster


@needs_floor
def test_cache_key_follows_the_sources(tmp_path: Path) -> None:
    """A source change is a new library name (rebuild); the same sources find the cached one."""
    a = tmp_path / "a"
    shutil.copytree(build.CSRC, a)
    cc, cxx = (shutil.which(c) for c in build.compilers())
    cflags, link = build._torch_flags()
    key = build._key(a, "avx2", cc, cxx, cflags, link)
    assert build._key(a, "avx2", cc, cxx, cflags, link) == key
    (a / "small.c").write_text((a / "small.c").read_text() + "\n/* changed */\n")
    assert build._key(a, "avx2", cc, cxx, cflags, link) != key


def test_load_is_idempotent() -> None:
    if not build.cpu_ok():
        pytest.skip("CPU below the AVX2/FMA/F16C floor")
    p = build.load()
    assert build.load() == p and p.is_file()
