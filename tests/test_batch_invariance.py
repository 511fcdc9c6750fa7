"""Batch invariance: a request gives bitwise the same logits, hence the same greedy tokens, alone or among 16
concurrent ones, with the mode on (`LLM(batch_invariant=True)`, `--batch-invariant`, `MOESERVE_BATCH_INVARIANT=1`).

The model is a random Qwen3-MoE (2 layers, hidden 256, 8 experts top-2; Q4_K experts, Q6_K attention, Q8_0
embedding and lm_head) built to have near-ties: its lm_head rows come in pairs, row 2j + 1 being row 2j with one
weight one quantization step apart in a block whose scale is shrunk 1024x, so at every step the two best logits
are a pair a few float32 ulps apart (median gap 5e-7, logits ~1): which one wins is decided by the last bits of
the arithmetic, and one different token changes the rest of the request.

Without the mode (the default kernels) the test fails: the kernels change regime with the number of rows in a
step (integer dots vs the GEMMs from 4 or 12 rows, the fused vs the grouped MoE past 32 tokens, SDPA over a whole
prefill chunk vs the one-query kernel), so (nearly) every logits row compared differs bitwise (by up to ~7e-4),
and on the development machine (Xeon with AVX-512 VNNI, torch 2.13, 2 threads) 9 of the 16 requests produce other
greedy tokens in the batch than alone (11 with a 40-token step budget; 10 and 13 on the dense model).
`test_default_kernels_are_not_batch_invariant` keeps that sensitivity checked (on the logits only: which requests
flip depends on the machine). With the mode every request matches its solo run token for token and every logits
row is bitwise equal, whether its prompt is prefilled in one chunk or many.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from moeserve import LLM, SamplingParams
from moeserve.engine.engine import EngineConfig, LLMEngine
from moeserve.errors import RequestError
from moeserve.gguf.quants import random_quant_bytes
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.metadata import positions_metadata
from moeserve.kernels.select import select_backend
from moeserve.testing import ModelSpec, rewrite_gguf, write_model

N_REQUESTS, N_TOKENS = 16, 24
GREEDY = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)


def near_tie_model(path: Path, spec: ModelSpec, shrink: float = 1024.0) -> Path:
    """`spec` written to `path` with its Q8_0 lm_head rows in near-tied pairs (see the module docstring)."""
    base = write_model(path.with_suffix(".base.gguf"), spec)
    out = next(t for t in GGUFReader(str(base)).tensors if t.name == "output.weight")
    raw = np.array(out.data, dtype=np.uint8).reshape(spec.vocab_size, -1).copy()  # Q8_0 blocks: f16 d, 32 x int8
    raw[1::2] = raw[0::2]
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32) / shrink
    raw[:, 0:2] = d.astype(np.float16).view(np.uint8)
    code = raw[1::2, 2].view(np.int8)
    raw[1::2, 2] = np.where(code < 127, code + 1, code - 1).astype(np.int8).view(np.uint8)
    return rewrite_gguf(base, path, tensors={"output.weight": (raw, QT.Q8_0)})


MOE = ModelSpec(n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8, n_experts_used=2,
                expert_ffn=256, vocab_size=512, qtype=QT.Q6_K,
                qtypes={"*_exps*": QT.Q4_K, "*ffn_gate_inp*": QT.F32, "token_embd.weight": QT.Q8_0,
                        "output.weight": QT.Q8_0})
DENSE = ModelSpec(arch="qwen3", n_layers=2, hidden_size=320, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512,
                  vocab_size=512, qtype=QT.Q8_0, qtypes={"*attn_q.*": QT.F32, "*attn_v*": QT.F16})
"""Every fallback of the mode: hidden 320 is no multiple of 256 (reference linears, one row per call), float
q/v projections (torch matmuls, one row per call), the dense SwiGLU (SiLU one row per call)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("batch-invariance")
    return {"moe": near_tie_model(d / "moe.gguf", MOE), "dense": near_tie_model(d / "dense.gguf", DENSE)}


def prompts(vocab: int, seed: int = 1) -> list[list[int]]:
    """N_REQUESTS distinct prompts of 3..59 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.permutation(np.arange(3, 60, 57 // N_REQUESTS))[:N_REQUESTS]
    return [rng.integers(0, vocab - 3, size=int(n)).tolist() for n in lengths]


def generate(llm: LLM, engine: LLMEngine, batch: list[list[int]]) -> tuple[list[list[int]], dict]:
    """Greedy tokens of every prompt, run together on `engine`, and the logits row of each (prompt, step)."""
    logits: dict[tuple[tuple[int, ...], int], torch.Tensor] = {}
    runner, execute = engine.runner, engine.runner.execute

    def recording(chunks, argmax=False):  # noqa: ANN001, ANN202  (the logits, even where only the argmax is asked)
        out = execute(chunks)
        sampled = [c.state.seq for c in chunks if c.samples]
        for row, seq in zip(out, sampled, strict=True):
            logits[(tuple(seq.prompt_ids), len(seq.output_ids))] = row.clone()
        return runner.model.argmax(out) if argmax else out

    llm.engine, saved = engine, llm.engine
    runner.execute = recording
    try:
        outs = llm.generate(batch, GREEDY)
    finally:
        runner.execute, llm.engine = execute, saved
    return [list(o.outputs[0].token_ids) for o in outs], logits


def compare(llm: LLM, batch: list[list[int]], **engine: object) -> tuple[int, int, int]:
    """Run `batch` together, then each prompt alone (fresh engines, no prefix cache); returns (requests whose
    tokens differ, logits rows compared, rows that differ bitwise), rows compared while the tokens agree."""
    config = EngineConfig(enable_prefix_caching=False, batch_invariant=llm.engine_config.batch_invariant,
                          kv_cache_dtype=llm.engine_config.kv_cache_dtype, **engine)  # type: ignore[arg-type]
    tokens, logits = generate(llm, llm.make_engine(config), batch)
    solo_config = EngineConfig(enable_prefix_caching=False, kv_cache_dtype=llm.engine_config.kv_cache_dtype)
    differ = compared = rows_differ = 0
    for prompt, got in zip(batch, tokens, strict=True):
        (alone,), alone_logits = generate(llm, llm.make_engine(solo_config), [prompt])
        differ += got != alone
        for step in range(N_TOKENS):
            if got[:step] != alone[:step]:
                break
            compared += 1
            rows_differ += not torch.equal(logits[(tuple(prompt), step)], alone_logits[(tuple(prompt), step)])
    return differ, compared, rows_differ


@pytest.mark.parametrize("model, kv_dtype, env", [
    ("moe", "auto", {}),  # the native kernels throughout
    ("moe", "auto", {"MOESERVE_FUSED_ROUTER": "0"}),  # routing in torch, one token at a time
    ("moe", "auto", {"MOESERVE_FUSED_MOE": "0"}),  # the grouped reference MoE, one token at a time
    ("dense", "bfloat16", {}),  # the fallbacks (see DENSE), attention over a pool the native kernel cannot read
])
def test_batch_invariant_greedy_matches_solo(models, monkeypatch, model, kv_dtype, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    llm = LLM(str(models[model]), batch_invariant=True, max_model_len=128, kv_cache_dtype=kv_dtype, warmup=False)
    assert llm.backend.batch_invariant and llm.model.batch_invariant
    batch = prompts(llm.config.vocab_size)
    for budget in (512, 40):  # every prompt's prefill in one step with the others; chunks of 40 rows mixed with decodes
        differ, compared, rows_differ = compare(llm, batch, max_num_batched_tokens=budget)
        assert (differ, rows_differ) == (0, 0), (
            f"budget {budget}: {differ} of {N_REQUESTS} requests changed tokens in the batch, "
            f"{rows_differ} of {compared} logits rows differ")
        assert compared == N_REQUESTS * N_TOKENS


def test_logits_of_a_full_forward_equal_those_of_generation(models):
    """`LLM.logits` (one sequence, no cache, all its rows at once) gives the rows that generation gave step by
    step: the same per-row kernels, attention included."""
    llm = LLM(str(models["moe"]), batch_invariant=True, max_model_len=128, warmup=False)
    batch = prompts(llm.config.vocab_size)[:4]
    tokens, logits = generate(llm, llm.engine, batch)
    for prompt, out in zip(batch, tokens, strict=True):
        full = torch.from_numpy(llm.logits(prompt + out[:-1]))
        for step in range(N_TOKENS):
            assert torch.equal(full[len(prompt) - 1 + step], logits[(tuple(prompt), step)]), (prompt, step)


def test_default_kernels_are_not_batch_invariant(models):
    """The sensitivity of the test above: with the default kernels the same comparison sees other logits bits
    (so the near-ties model and the comparison would catch a mode that is not batch invariant)."""
    llm = LLM(str(models["moe"]), max_model_len=128, warmup=False)
    assert not llm.backend.batch_invariant
    differ, compared, rows_differ = compare(llm, prompts(llm.config.vocab_size))
    assert rows_differ > 0, f"{compared} logits rows all bitwise equal: the default became batch invariant?"


def test_the_mode_is_chosen_at_load(models, monkeypatch):
    monkeypatch.setenv("MOESERVE_BATCH_INVARIANT", "1")
    llm = LLM(str(models["moe"]), max_model_len=64, warmup=False)
    assert llm.engine_config.batch_invariant and llm.backend.batch_invariant and llm.model.batch_invariant
    assert not LLM(str(models["moe"]), max_model_len=64, warmup=False, batch_invariant=False).backend.batch_invariant
    monkeypatch.setenv("MOESERVE_BATCH_INVARIANT", "maybe")
    with pytest.raises(RequestError, match="MOESERVE_BATCH_INVARIANT"):
        LLM(str(models["moe"]), max_model_len=64, warmup=False)
    monkeypatch.delenv("MOESERVE_BATCH_INVARIANT")
    for kernels in ("reference", "triton"):
        with pytest.raises(RequestError, match="cpu backend only"):
            select_backend(kernels, "cpu", batch_invariant=True)
    default = LLM(str(models["moe"]), max_model_len=64, warmup=False)
    with pytest.raises(RequestError, match="batch-invariant kernels"):
        default.make_engine(EngineConfig(batch_invariant=True))


def packed(name: str, qt: QT, shape: tuple[int, ...], rng: np.random.Generator) -> PackedTensor:
    data = torch.from_numpy(random_quant_bytes(qt, shape, rng, scale=shape[-1] ** -0.5))
    return PackedTensor(name, int(qt), shape, data.reshape(*shape[:-1], -1))


def test_row_invariant_kernels_give_each_row_its_solo_result():
    """Kernel level: each object the mode hands out gives row i of a T-row call bitwise what it gives that row
    alone — with the few-row kernel's calls split into slices of rows (`max_rows`, forced small here) too."""
    rng = np.random.default_rng(0)
    backend = select_backend("cpu", "cpu", batch_invariant=True)
    H, nh, nkv, hd, T = 512, 4, 2, 64, 23
    x = torch.randn(T, H)
    pos = torch.arange(T, dtype=torch.long) * 3
    linears = {qt.name: backend.linear(packed("w", qt, (96, H), rng)) for qt in (QT.Q4_K, QT.Q6_K, QT.Q8_0, QT.F32)}
    for lin in linears.values():
        if hasattr(lin, "max_rows"):
            lin.max_rows = 5
    wq, wk, wv = (backend.linear(packed(n, QT.Q4_K, (m * hd, H), rng)) for n, m in (("q", nh), ("k", nkv), ("v", nkv)))
    for lin in (wq, wk, wv):
        lin.max_rows = 5
    rope = backend.rope(hd, 1e6, True, 128)
    qkv = backend.qkv(0, wq, wk, wv, torch.rand(hd) + 0.5, torch.rand(hd) + 0.5, rope, nh, nkv, hd, 1e-6)
    qkv.fused.max_rows = 5
    E, I = 8, 256
    router = PackedTensor("r", int(QT.F32), (E, H), (torch.randn(E, H) / 8).contiguous().view(torch.uint8))
    moe = backend.moe(router, packed("g", QT.Q4_K, (E, I, H), rng), packed("u", QT.Q4_K, (E, I, H), rng),
                      packed("d", QT.Q6_K, (E, H, I), rng), top_k=2, renormalize=True)
    odd = backend.linear(packed("odd", QT.Q8_0, (H, 320), rng))  # K % 256 != 0: the reference linear
    mlp = backend.mlp(backend.linear(packed("g", QT.Q8_0, (320, H), rng)),
                      backend.linear(packed("u", QT.F16, (320, H), rng)), odd)
    norm = backend.norm(torch.rand(H) + 0.5, 1e-6)
    kernels = {**{f"linear {k}": lin for k, lin in linears.items()}, "moe": moe, "mlp": mlp, "norm": norm,
               "qkv": lambda h, p: torch.cat([t.reshape(h.shape[0], -1) for t in qkv(h, positions_metadata(p))], dim=1)}
    for name, fn in kernels.items():
        call = fn if name == "qkv" else (lambda h, p, fn=fn: fn(h))
        batched = call(x, pos)
        alone = torch.cat([call(x[i:i + 1].clone(), pos[i:i + 1].clone()) for i in range(T)])
        assert torch.equal(batched, alone), name
