"""Backend selection and the interface contract: the model's layers hold backend kernel objects and never
ask which backend made them."""

from __future__ import annotations

import pytest
import torch

from moeserve import LLM
from moeserve.errors import RequestError
from moeserve.kernels.backend import Backend
from moeserve.kernels.cpu.backend import CpuBackend
from moeserve.kernels.metadata import no_cache_metadata
from moeserve.kernels.reference import ReferenceBackend
from moeserve.kernels.select import backend_name, select_backend


def test_names_env_and_defaults(monkeypatch):
    monkeypatch.delenv("MOESERVE_KERNELS", raising=False)
    assert backend_name(None, "cpu") == "cpu" and backend_name("auto", "cpu") == "cpu"
    assert backend_name("fast", "cpu") == "cpu"  # the old name
    assert backend_name(None, "cuda") == "triton"
    monkeypatch.setenv("MOESERVE_KERNELS", "reference")
    assert backend_name(None, "cpu") == "reference"
    assert backend_name("cpu", "cpu") == "cpu"  # an explicit argument beats the environment
    with pytest.raises(RequestError, match="kernels must be one of"):
        backend_name("turbo", "cpu")
    with pytest.raises(RequestError, match="run on the CPU"):
        backend_name("cpu", "cuda")
    assert isinstance(select_backend("cpu"), CpuBackend) and isinstance(select_backend("reference"), ReferenceBackend)


def test_layers_hold_one_kernel_object_per_operation(tiny_moe):
    for kernels, cls in (("cpu", CpuBackend), ("reference", ReferenceBackend)):
        llm = LLM(str(tiny_moe), kernels=kernels, warmup=False)
        assert isinstance(llm.backend, cls) and isinstance(llm.backend, Backend) and llm.kernels == kernels
        for block in llm.model.blocks:
            attn = block.attn
            assert callable(attn.qkv) and callable(attn.attn) and callable(attn.o_proj)
            assert callable(block.ffn) and callable(block.attn_norm) and callable(block.ffn_norm)
            assert not {"fast", "fused", "fast_decode", "norm_rope", "qkv_rope", "fast_norm"} & set(vars(block))
        ids = [1, 2, 3, 4]
        assert llm.logits(ids).shape == (4, llm.config.vocab_size)


def test_cpu_backend_kernels_match_reference_on_one_layer(tiny_moe):
    """Each of the cpu backend's kernel objects against the reference's, on the same inputs."""
    cpu, ref = (LLM(str(tiny_moe), kernels=k, warmup=False).model for k in ("cpu", "reference"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, cpu.config.hidden_size, generator=g)
    meta = no_cache_metadata([5])
    torch.testing.assert_close(cpu.blocks[0].attn_norm(x), ref.blocks[0].attn_norm(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(cpu.blocks[0].attn.qkv(x, meta), ref.blocks[0].attn.qkv(x, meta), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu.blocks[0].ffn(x), ref.blocks[0].ffn(x), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([3, 1, 4, 1, 5])
    torch.testing.assert_close(cpu.embed(ids), ref.embed(ids))
