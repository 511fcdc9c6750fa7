"""Sizing the KV pool on a GPU: a profile run measures what one step needs before the pool takes the rest.

The arithmetic and the dummy step run on the CPU: torch.cuda's allocator counters are replaced by a fake
whose peak grows with the rows of the step the model is given, so the test sees which steps were run and
what was kept free for them. (On a GPU, `benchmarks/gpu_bench.py` exercises the real counters.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import moeserve.engine.runner as runner_module
from moeserve import LLM
from moeserve.engine.engine import EngineConfig, gpu_kv_budget
from moeserve.engine.paged_cache import BLOCK_SIZE, KVPool
from moeserve.engine.runner import PROFILE_MARGIN, HostStep, ModelRunner, dummy_step
from moeserve.errors import RequestError

GiB = 1024**3
PER_ROW = 1000  # fake transient bytes per row of a step


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, tiny_moe: Path) -> Iterator[LLM]:
    yield LLM(str(tiny_moe), max_model_len=48, warmup=False)


class FakeCuda:
    """torch.cuda's memory counters, driven by the model's forward: each step allocates PER_ROW per row."""

    def __init__(self, model, free: int = 60 * GiB, total: int = 80 * GiB, oom_rows: int | None = None) -> None:
        self.free, self.total, self.oom_rows = free, total, oom_rows
        self.allocated = self.peak = 5 * GiB
        self.steps: list[tuple[int, int, list[int]]] = []  # (rows, sampled rows, sequence lengths)
        self.forward = model.forward

    def run(self, ids, meta, logit_rows=None, argmax=False):
        rows = ids.numel()
        if self.oom_rows is not None and rows >= self.oom_rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        self.steps.append((rows, logit_rows.numel(), meta.seq_lens.tolist()))
        self.peak = max(self.peak, self.allocated + PER_ROW * rows)
        return self.forward(ids, meta, logit_rows, argmax=argmax)

    def install(self, mp: pytest.MonkeyPatch, model) -> FakeCuda:
        mp.setattr(model, "forward", self.run)
        mp.setattr(runner_module, "has_allocator_stats", lambda device: True)
        mp.setattr(torch.cuda, "synchronize", lambda device=None: None)
        mp.setattr(torch.cuda, "empty_cache", lambda: None)
        mp.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.allocated))
        mp.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        mp.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        mp.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, self.total))
        return self


def test_dummy_step_is_the_largest_step_in_whole_sequences() -> None:
    h = dummy_step(rows=40, seq_len=16, sampled=3)
    assert h.lens == [16, 16, 8] and h.starts == [0, 16, 32, 40] and h.contexts == [0, 0, 0]
    assert h.rows == [37, 38, 39] and len(h.ids) == len(h.positions) == len(h.slots) == 40
    blocks = [b for t in h.tables for b in t]
    assert blocks == list(range(len(blocks)))  # every sequence in blocks of its own
    assert len(set(h.slots)) == 40 and all(s // BLOCK_SIZE in t for s, t in zip(h.slots[:16], [h.tables[0]] * 16))
    assert HostStep.unpack(h.pack()) == h  # what a parallel group's worker would replay
    assert dummy_step(rows=5, seq_len=16, sampled=8).rows == [0, 1, 2, 3, 4]


def test_dummy_step_runs_like_a_real_prefill(llm: LLM) -> None:
    """The profile run is a valid step: its last sequence's logits are those of the same ids run alone."""
    model = llm.model
    vocab = model.config.vocab_size
    h = dummy_step(rows=2 * 48 + 9, seq_len=48, sampled=1, vocab=vocab)
    assert len(set(h.ids)) > 90 and max(h.ids) < vocab  # spread over the vocabulary (a MoE's experts)
    pool = KVPool(model.cache_config, sum(len(t) for t in h.tables), torch.float32, model.device)
    logits = ModelRunner(model, pool, enforce_eager=True).run(h)
    alone = torch.from_numpy(llm.logits(h.ids[-9:])[-1:])
    torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)


def test_budget_keeps_the_profiled_peaks_free(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    model = llm.model
    monkeypatch.setattr(model, "graph_safe", True)
    fake = FakeCuda(model).install(monkeypatch, model)
    c = EngineConfig(max_num_batched_tokens=100, max_num_seqs=6, gpu_memory_utilization=0.5)
    budget, kept = gpu_kv_budget(model, c, torch.float16)
    # the largest prefill step (whole sequences of at most max_model_len = 48), then one decode-sized step
    assert fake.steps == [(100, 6, [48, 48, 4]), (6, 6, [6])]
    assert kept == PER_ROW * (100 + 6)
    assert budget == int(0.5 * 80 * GiB) - 20 * GiB - kept - PROFILE_MARGIN

    fake.steps.clear()  # more tokens per step than max_num_seqs full contexts hold: the largest possible step
    gpu_kv_budget(model, EngineConfig(max_num_batched_tokens=2**20, max_num_seqs=2), torch.float16)
    assert fake.steps == [(96, 2, [48, 48]), (2, 2, [2])]

    fake.steps.clear()  # no captured graphs: no second pool to keep free
    eager, _ = gpu_kv_budget(model, EngineConfig(max_num_batched_tokens=100, max_num_seqs=6, enforce_eager=True,
                                                 gpu_memory_utilization=0.5), torch.float16)
    assert fake.steps == [(100, 6, [48, 48, 4])] and eager == budget + PER_ROW * 6


def test_a_step_that_cannot_fit_is_refused_at_load(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    model = llm.model
    fake = FakeCuda(model, free=2 * GiB, oom_rows=1024).install(monkeypatch, model)
    with pytest.raises(RequestError, match=r"1536 rows \(max_num_batched_tokens=8192\) .* 2.00 GiB .* lower max_num_b"):
        gpu_kv_budget(model, EngineConfig(max_num_batched_tokens=8192), torch.float16)  # 32 seqs x 48 positions
    monkeypatch.setattr(model, "graph_safe", True)  # the captured graphs' step is the one that cannot fit
    monkeypatch.setattr(fake, "oom_rows", 512)  # graphs are captured up to 512 rows; larger batches run eagerly
    with pytest.raises(RequestError, match=r"512 rows \(max_num_seqs=5000\) .* lower max_num_seqs"):
        gpu_kv_budget(model, EngineConfig(max_num_batched_tokens=256, max_num_seqs=5000), torch.float16)
    assert gpu_kv_budget(model, EngineConfig(max_num_batched_tokens=256), torch.float16)[0] == 0  # 0.9*80-78 < 0


@pytest.mark.parametrize("field, value, message", [
    ("max_num_batched_tokens", 0, r"max_num_batched_tokens must be a whole number in \[1, 1048576\], got 0"),
    ("max_num_batched_tokens", 10**12, r"max_num_batched_tokens must be a whole number in \[1, 1048576\]"),
    ("max_num_seqs", 2.5, r"max_num_seqs must be a whole number in \[1, 65536\], got 2.5"),
    ("max_num_seqs", 10**9, "max_num_seqs must be a whole number in"),
    ("max_num_seqs", True, "max_num_seqs must be a whole number"),
    ("num_kv_blocks", -3, "num_kv_blocks must be a whole number >= 1, got -3"),
    ("kv_cache_memory", "lots", "kv_cache_memory: cannot parse memory size 'lots'"),
    ("kv_cache_dtype", "int8", "kv_cache_dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got 'int8'"),
    ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization must be in \(0, 1\], got 1.5"),
    ("gpu_memory_utilization", "0.5", "gpu_memory_utilization must be in"),
])
def test_engine_knobs_are_checked_before_the_model_loads(field: str, value: object, message: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import moeserve.engine.llm as llm_module

    monkeypatch.setattr(llm_module, "load_decoder", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RequestError, match=message):
        LLM(None, warmup=False, **{field: value})


def test_graphs_are_captured_up_to_512_rows(llm: LLM) -> None:
    """vLLM's cap: a decode batch of more rows runs eagerly (its launches are a small share of its time), so a
    large max_num_seqs costs no 5000-row graph, buffer or profile step."""
    from moeserve.engine.cuda_graphs import DecodeGraphs

    pool = KVPool(llm.model.cache_config, 4, torch.float32, "cpu")
    graphs = DecodeGraphs(llm.model, pool, 5000)
    assert graphs.max_batch == 512 and graphs.buckets[-3:] == [256, 384, 512]
    assert DecodeGraphs(llm.model, pool, 40).buckets == [1, 2, 4, 8, 16, 24, 32, 40]


def test_weights_that_cannot_fit_the_gpu_are_one_line(tiny_moe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moeserve.engine.llm as llm_module

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GiB, 80 * GiB))
    llm_module.gpu_weights_fit("m.gguf", 2 * GiB, torch.device("cuda"))  # fits: nothing to say
    with pytest.raises(RequestError, match=r"m.gguf: the weights need 17.50 GiB on cuda, which has 3.00 GiB of its "
                                           r"80 GiB free \(a smaller quantization"):
        llm_module.gpu_weights_fit("m.gguf", int(17.5 * GiB), torch.device("cuda"))

    def upload(*args, **kwargs):  # what load_decoder raises when the upload itself runs out
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    monkeypatch.setattr(llm_module, "load_decoder", upload)
    with pytest.raises(RequestError, match=rf"{tiny_moe}: the weights do not fit on cpu, which has 3.00 GiB"):
        LLM(str(tiny_moe), warmup=False)
