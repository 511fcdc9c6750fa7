"""Tensor and expert parallelism over torch.distributed (gloo, 2 ranks on this machine).

Every split must compute what one process computes: logits within 1e-4·max|logits| and the same 32
greedy tokens, on the reference backend (the oracle) for the parity configurations and on the cpu
backend for one. The server answers with 2 ranks behind it, and a rank that dies ends the other with
an error within the collective timeout, never a hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch

from moeserve import LLM, SamplingParams
from moeserve.engine.distributed import ParallelError
from moeserve.engine.runner import HostStep
from moeserve.errors import RequestError
from moeserve.gguf.reader import GGUFFile
from moeserve.model.parallel import Shard, VocabHead, plan_heads, split, take_cols, take_rows
from tests.test_parity_hf import CONFIGS

ROOT = Path(__file__).resolve().parent.parent
MODES = {"tp": dict(expert_parallel=False), "ep": dict(expert_parallel=True, split_attention=False),
         "tp+ep": dict(expert_parallel=True)}
PARITY = ["hd128-gqa4-e8k2-untied-mixed", "hd128-gqa8-e128k8-tied-q4km", "hd64-gqa4-e8k2-untied-kquants",
          "hd64-gqa8-e16k4-untied-f16q8-window", "llama-q4"]
PROMPT = list(range(3, 27))
STEPS = 32


def greedy(llm: LLM, prompt: list[int], steps: int = STEPS) -> list[int]:
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


_SINGLE: dict[tuple[str, str], tuple[np.ndarray, list[int]]] = {}


def single(path: Path, kernels: str) -> tuple[np.ndarray, list[int]]:
    key = (str(path), kernels)
    if key not in _SINGLE:
        llm = LLM(str(path), kernels=kernels, warmup=False)
        _SINGLE[key] = (llm.logits(PROMPT), greedy(llm, PROMPT))
    return _SINGLE[key]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", PARITY)
def test_two_ranks_match_one_process(make_model, name: str, mode: str) -> None:
    path = make_model(name, **CONFIGS[name])
    ref_logits, ref_tokens = single(path, "reference")
    with LLM(str(path), kernels="reference", warmup=False, tensor_parallel_size=2, parallel_timeout=60,
             **MODES[mode]) as llm:
        logits = llm.logits(PROMPT)
        err = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
        assert err <= 1e-4, f"{name} {mode}: max |Δlogits| = {err:.2e} of max|logits|"
        assert greedy(llm, PROMPT) == ref_tokens  # plain greedy: each rank sends its best (logit, token)
        with_logprobs = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
        out = llm.generate([PROMPT], with_logprobs)[0].outputs[0]  # the logit columns are gathered
        assert out.token_ids == ref_tokens[:8] and len(out.logprobs) == 8
        assert llm.model.shard.attention_split == (mode != "ep")  # these heads fall on o_proj's blocks
        held = llm.rank_weight_bytes
        assert len(held) == 2 and all(b > 0 for b in held)
        assert max(held) < GGUFFile(path).total_bytes()  # neither rank holds the whole model


def test_cpu_kernels_two_ranks_batched(make_model) -> None:
    """The native kernels under TP+EP, several sequences decoding together (paged KV on both ranks)."""
    name = "hd64-gqa4-e8k2-untied-kquants"
    path = make_model(name, **CONFIGS[name])
    prompts = [PROMPT, PROMPT[:7], list(range(40, 90))]
    one = LLM(str(path), kernels="cpu", warmup=False)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    ref = one.logits(PROMPT)
    hidden = one.engine.runner.hidden_full(PROMPT)  # what /v1/embeddings pools
    with LLM(str(path), kernels="cpu", warmup=False, tensor_parallel_size=2, expert_parallel=True) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        err = float(np.abs(llm.logits(PROMPT) - ref).max() / np.abs(ref).max())
        h = llm.engine.runner.hidden_full(PROMPT)
    assert err <= 1e-3
    assert got == want
    assert h.shape == hidden.shape and float((h - hidden).abs().max() / hidden.abs().max()) <= 1e-3


def test_rank_death_is_an_error_not_a_hang(make_model) -> None:
    """SIGKILL the worker: rank 0's next step raises ParallelError (gloo sees the closed connection)."""
    path = make_model("tiny_par", n_layers=2, hidden_size=128, head_dim=32, n_heads=4, n_kv_heads=2, n_experts=8,
                      n_experts_used=2, expert_ffn=64, vocab_size=384)
    llm = LLM(str(path), kernels="reference", warmup=False, tensor_parallel_size=2, parallel_timeout=10)
    try:
        greedy(llm, PROMPT, 2)
        (proc,) = llm._workers.procs
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        t0 = time.monotonic()
        with pytest.raises(ParallelError, match="parallel group"):
            greedy(llm, PROMPT, 4)
        assert time.monotonic() - t0 < 12
        with pytest.raises(ParallelError):  # and it stays failed, at once
            greedy(llm, PROMPT, 1)
    finally:
        llm.close()


def test_rank0_death_ends_the_worker(make_model, tmp_path: Path) -> None:
    """SIGKILL rank 0: the worker exits with an error line within the timeout."""
    path = make_model("tiny_par", n_layers=2, hidden_size=128, head_dim=32, n_heads=4, n_kv_heads=2, n_experts=8,
                      n_experts_used=2, expert_ffn=64, vocab_size=384)
    script = tmp_path / "rank0.py"
    script.write_text(
        "import os, signal, sys\n"
        "from moeserve import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(path)!r}, kernels='reference', tensor_parallel_size=2, parallel_timeout=10)\n"
        "    print(llm._workers.procs[0].pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    worker = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker), "the worker outlived rank 0"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_server_with_two_ranks(make_model) -> None:
    """`moeserve serve MODEL --tensor-parallel-size 2`: the openai client gets one process's greedy answers."""
    path = make_model("tiny_par_chat", n_layers=2, hidden_size=128, head_dim=32, n_heads=4, n_kv_heads=2,
                      n_experts=8, n_experts_used=2, expert_ffn=64, context_length=256, seed=5)
    one = LLM(str(path), kernels="cpu")
    messages = [[{"role": "user", "content": "Hello there"}], [{"role": "user", "content": "Count: 1 2 3"}]]
    want = [o.outputs[0].text for o in
            one.chat(messages, SamplingParams(max_tokens=12, temperature=0.0))]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "moeserve", "serve", str(path), "--port", str(port), "-c", "256",
                             "--kernels", "cpu", "--tensor-parallel-size", "2", "--expert-parallel", "-t", "2",
                             "--log-level", "warning", "-q"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for msgs, text in zip(messages, want, strict=True):
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
            assert r.choices[0].message.content == text
        stream = client.chat.completions.create(model=model, messages=messages[0], max_tokens=12, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode is not None


# -- the pieces ---------------------------------------------------------------------------------


def test_split_falls_on_units() -> None:
    assert split(768, 2, 256) == [0, 512, 768]
    assert split(128, 2) == [0, 64, 128]
    assert split(256, 2, 256) == [0, 256, 256]  # one block: one rank gets it all
    assert split(10, 3) == [0, 3, 7, 10]


def test_take_rows_and_cols_are_exact(make_model) -> None:
    name = "hd128-gqa4-e8k2-untied-mixed"
    f = GGUFFile(make_model(name, **CONFIGS[name]))
    w = f.tensor("blk.0.ffn_gate_exps.weight")  # Q4_K [E, I, H]
    full = w.dequantize()
    np.testing.assert_array_equal(take_rows(w, 2, 5).dequantize(), full[2:5])
    np.testing.assert_array_equal(take_rows(w, 64, 192, axis=1).dequantize(), full[:, 64:192])
    np.testing.assert_array_equal(take_cols(w, 0, 256).dequantize(), full[..., :256])
    with pytest.raises(ValueError, match="blocks"):
        take_cols(w, 0, 128)


def test_head_plans() -> None:
    two = [Shard(0, 2), Shard(1, 2)]
    assert [(p.q0, p.q1, p.k0, p.k1) for p in (plan_heads(8, 2, 128, 256, s) for s in two)] == \
        [(0, 4, 0, 1), (4, 8, 1, 2)]
    # one KV head for 8 q heads: each rank keeps it
    assert [(p.k0, p.k1) for p in (plan_heads(8, 1, 128, 256, s) for s in two)] == [(0, 1), (0, 1)]
    assert plan_heads(4, 4, 64, 256, two[0]) is None  # 2 heads x 64 = 128 columns: half a Q4_K block
    assert plan_heads(8, 2, 64, 32, Shard(0, 2, split_attention=False)) is None


def test_host_step_round_trip() -> None:
    h = HostStep(ids=[5, 6, 7, 9], positions=[0, 1, 2, 40], slots=[0, 1, 2, 72], starts=[0, 3, 4],
                 contexts=[0, 40], lens=[3, 41], tables=[[0], [3, 4, 5]], rows=[2, 3])
    assert HostStep.unpack(h.pack()) == h
    h.argmax = True
    assert HostStep.unpack(h.pack()) == h


class _TwoRanks(Shard):
    """Rank 0 of 2, with the other rank's gathered columns given."""

    def __init__(self, other: torch.Tensor) -> None:
        super().__init__(rank=0, size=2)
        self.other = other

    def gather_columns(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        return torch.cat([x, self.other], dim=1)


def test_split_vocabulary_argmax_is_the_global_first_maximum() -> None:
    """`VocabHead.argmax` picks what torch.argmax over the whole vocabulary picks: ties go to the lower token id
    (rank 0's range comes first), and a NaN wins."""
    logits = torch.tensor([[1.0, 5.0, 2.0], [0.0, 3.0, 3.0], [1.0, 2.0, 0.0], [0.0, 1.0, float("nan")]])
    # rank 1 holds tokens 3..5: its best (value, id) per row
    other = torch.tensor([[4.0, 3.0], [3.0, 4.0], [7.0, 5.0], [9.0, 3.0]])
    head = VocabHead(lambda x: x, [0, 3, 6], _TwoRanks(other), lambda x: torch.argmax(x, dim=-1))
    assert head.argmax(logits).tolist() == [1, 1, 5, 2]


def test_cli_flags_need_two_ranks() -> None:
    out = subprocess.run([sys.executable, "-m", "moeserve", "generate", "Hi", "-n", "1", "--expert-parallel"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=120)
    assert out.returncode != 0 and "--tensor-parallel-size" in out.stderr


def test_profile_step_runs_on_every_rank(make_model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizing the pools of a parallel group on GPUs: rank 0's dummy step goes to the workers (PROFILE), all
    ranks meet in its collectives (no hang), and the group serves exactly as before afterwards."""
    from moeserve.engine.engine import EngineConfig, gpu_kv_budget
    from moeserve.engine.runner import PROFILE_MARGIN
    from tests.test_gpu_budget import PER_ROW, FakeCuda

    name = "hd64-gqa4-e8k2-untied-kquants"
    path = make_model(name, **CONFIGS[name])
    _, ref_tokens = single(path, "reference")
    with LLM(str(path), kernels="reference", warmup=False, tensor_parallel_size=2, parallel_timeout=60) as llm:
        with monkeypatch.context() as mp:
            fake = FakeCuda(llm.model).install(mp, llm.model)  # rank 0's allocator counters (the workers run on)
            budget, kept = gpu_kv_budget(llm.model, EngineConfig(max_num_batched_tokens=70, max_num_seqs=3,
                                                           gpu_memory_utilization=0.5), torch.float32, llm._driver)
        assert fake.steps == [(70, 3, [70])]  # no captured graphs in a group: one step
        # the workers (CPU: no allocator to read) said no limit; the smallest budget, rank 0's, sizes every pool
        assert kept == PER_ROW * 70 and budget == 40 * 1024**3 - 20 * 1024**3 - kept - PROFILE_MARGIN
        assert greedy(llm, PROMPT) == ref_tokens
    # an engine that cannot be made (no KV block fits) stops the ranks it started: none is left waiting
    import multiprocessing

    with pytest.raises(RequestError, match="holds no KV block"):
        LLM(str(path), kernels="reference", warmup=False, tensor_parallel_size=2, kv_cache_memory=1)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("moeserve-rank")]
