"""Continuous batching: scheduler rules on fake sequences, then the engine on a tiny random model.

The engine tests hold batched, chunked, preempted and prefix-cached runs to the tokens that one
sequence alone produces (its own engine: no batch-mates, no chunks, no prefix cache).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from moeserve.engine.engine import EngineConfig, LLMEngine, OutputKind
from moeserve.engine.llm import LLM
from moeserve.engine.paged_cache import BLOCK_SIZE, BlockAllocator, KVPool
from moeserve.engine.sampling import SamplingParams
from moeserve.engine.scheduler import Scheduler, SeqStatus
from moeserve.engine.sequence import Sequence
from moeserve.errors import RequestError
from moeserve.gguf.config import ModelConfig
from moeserve.testing import ModelSpec, write_model

CFG = ModelConfig(arch="qwen3moe", vocab_size=64, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                  rms_eps=1e-6, rope_theta=1e4, rope_dim=8, context_length=256)


# -- the scheduler alone --------------------------------------------------------------------------
def make_scheduler(blocks: int, max_num_seqs: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(KVPool(CFG, blocks), BlockAllocator(blocks), max_num_seqs, budget)


def add(s: Scheduler, prompt: list[int]):  # -> SeqState
    st = s.new_state(Sequence(request_id=str(len(prompt)), prompt_ids=prompt, params=SamplingParams(max_tokens=None)))
    s.add(st)
    return st


def step(s: Scheduler) -> dict[int, int]:
    """One schedule/commit round, 'sampling' token 7 for chunks that end their sequence."""
    out = s.schedule()
    s.commit(out)
    for c in out.chunks:
        if c.samples:
            c.state.seq.output_ids.append(7)
    return {id(c.state): c.length for c in out.chunks}


def test_chunked_prefill_respects_the_token_budget() -> None:
    s = make_scheduler(16, budget=16)
    a = add(s, list(range(40)))
    assert [step(s)[id(a)] for _ in range(3)] == [16, 16, 8]
    assert a.seq.output_ids == [7] and a.num_computed == 40
    b = add(s, list(range(100, 130)))
    got = step(s)
    assert got[id(a)] == 1 and got[id(b)] == 15  # decode goes first, the prefill gets the rest


def test_max_num_seqs_and_fifo_admission() -> None:
    s = make_scheduler(32, max_num_seqs=2)
    a, b, c = (add(s, [1, 2, 3]) for _ in range(3))
    step(s)
    assert s.running == [a, b] and list(s.waiting) == [c]
    s.finish(a)
    step(s)
    assert s.running == [b, c]


def test_newest_is_preempted_and_recomputed_first() -> None:
    s = make_scheduler(4)
    old, new = add(s, list(range(31))), add(s, list(range(100, 131)))
    step(s)  # both prefill: 2 blocks each, pool full
    assert s.allocator.num_free == 0
    got = step(s)  # both decode position 31: still fits in their second block
    assert len(got) == 2
    got = step(s)  # position 32 needs a third block each: `new` makes room for `old`
    assert id(old) in got and id(new) not in got
    assert new.status is SeqStatus.WAITING and s.waiting[0] is new and new.num_computed == 0
    assert s.num_preemptions == 1 and len(new.kv.blocks) == 0
    s.finish(old)
    got = step(s)  # `new` is recomputed; its head block survived in the prefix cache (its tail was reused)
    assert new.status is SeqStatus.RUNNING and got[id(new)] == 33 - 16 and s.allocator.prefix_hits == 16


def test_a_lone_sequence_that_fills_the_pool_is_stopped() -> None:
    s = make_scheduler(2)
    a = add(s, list(range(31)))
    for _ in range(2):
        step(s)
    out = s.schedule()
    assert out.exhausted == [a] and not out.chunks and s.allocator.num_used == 0


def test_prefix_blocks_are_shared_not_recomputed() -> None:
    s = make_scheduler(16)
    prefix = list(range(40))
    a = add(s, prefix + [50])
    step(s)
    b = add(s, prefix + [60, 61])
    got = step(s)
    assert b.num_computed == 42 and got[id(b)] == 42 - 32  # two full blocks came from the cache
    assert b.kv.blocks[:2] == a.kv.blocks[:2] and s.allocator.ref[a.kv.blocks[0]] == 2
    assert s.allocator.prefix_hits == 32
    s.finish(a)
    s.finish(b)
    assert s.allocator.num_used == 0
    c = add(s, prefix[:32])  # exactly two blocks: the last one is recomputed for its logits
    step(s)
    assert c.seq.num_cached_tokens == BLOCK_SIZE


# -- the engine on a tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is fastest and immune to a busy machine
    path = write_model(tmp_path_factory.mktemp("sched") / "tiny.gguf", ModelSpec(context_length=256, seed=3))
    yield LLM(str(path), max_model_len=256)
    torch.set_num_threads(threads)


def reference(llm: LLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of one sequence alone: no batching, no chunks, no prefix cache."""
    engine = llm.make_engine(EngineConfig(max_num_seqs=1, max_num_batched_tokens=1024, enable_prefix_caching=False))
    return run(engine, [prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 500, (n,), generator=g).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def run(engine: LLMEngine, ps: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    rids = [engine.add_request(p, params) for p in ps]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out.outputs[0].token_ids
    return [done[r] for r in rids]


def test_batched_chunked_generate_matches_one_at_a_time(llm: LLM) -> None:
    ps = prompts(3, 17, 40, 1, 33)
    engine = llm.make_engine(EngineConfig(max_num_batched_tokens=24))  # prompts arrive in chunks
    got = run(engine, ps)
    assert got == [reference(llm, p, 12) for p in ps]
    assert engine.stats().pool.used_blocks == 0


def test_preemption_under_a_tiny_pool_keeps_exact_tokens(llm: LLM) -> None:
    ps = prompts(20, 25, 18, 30, seed=1)
    engine = llm.make_engine(EngineConfig(num_kv_blocks=7, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    got = run(engine, ps, params)
    assert engine.stats().preemptions > 0
    assert got == [reference(llm, p, 30) for p in ps]
    assert engine.allocator.num_used == 0


def test_prefix_cache_hits_give_identical_tokens(llm: LLM) -> None:
    system = prompts(45, seed=2)[0]
    ps = [system + q for q in prompts(5, 9, seed=4)]
    engine = llm.make_engine(EngineConfig())
    first = run(engine, ps[:1])
    second = run(engine, ps[1:])  # shares system's first 32 tokens (two full blocks) with the first
    s = engine.stats()
    assert s.pool.prefix_hits == 32 and s.computed_prompt_tokens == len(ps[0]) + len(ps[1]) - 32
    assert first + second == [reference(llm, p, 12) for p in ps]
    again = run(engine, ps[:1])  # the whole cached prompt (minus its last partial block)
    assert again == first and engine.stats().pool.prefix_hits == 32 + 48


def test_seeded_sampling_does_not_depend_on_batch_mates(llm: LLM) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    engine = llm.make_engine(EngineConfig())
    alone = run(engine, prompts(10), params)
    together = run(engine, prompts(10) + prompts(7, 30, seed=9), params)
    assert together[0] == alone[0]


def test_abort_frees_blocks_and_deltas_add_up(llm: LLM) -> None:
    engine = llm.make_engine(EngineConfig())
    rid = engine.add_request(prompts(40)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.allocator.num_used == 3
    assert engine.abort_request(rid) and not engine.abort_request(rid)
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()
    assert engine.stats().finished == {"abort": 1}

    params = SamplingParams(n=2, max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=1)
    rid = engine.add_request(prompts(9)[0], params, kind=OutputKind.DELTA)
    tokens: dict[int, list[int]] = {0: [], 1: []}
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            for c in out.outputs:
                tokens[c.index] += c.token_ids
                assert len(c.logprobs) == len(c.token_ids)
                if c.finish_reason:
                    finals[c.index] = c.finish_reason
    assert tokens[0] == tokens[1] == reference(llm, prompts(9)[0], 6) and finals == {0: "length", 1: "length"}


def test_requests_that_can_never_fit_are_rejected(llm: LLM) -> None:
    engine = llm.make_engine(EngineConfig(num_kv_blocks=2))
    with pytest.raises(RequestError, match="KV cache holds only 32 tokens"):
        engine.add_request(prompts(40)[0])
    with pytest.raises(RequestError, match="maximum context length"):
        engine.add_request(prompts(300)[0])
    assert not engine.has_unfinished()
    with pytest.raises(RequestError, match="needs 120 KV slots"):  # could only be cut short: refused up front
        engine.add_request(prompts(20)[0], SamplingParams(max_tokens=100))
    # A lone request without a limit that outgrows the whole pool stops with "length" instead of livelocking.
    [out] = run(engine, prompts(20), SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
    assert len(out) == 2 * BLOCK_SIZE - 20 + 1 and engine.allocator.num_used == 0  # the last token needs no slot
