"""Programmatic dependent launch (`moeserve.kernels.triton.pdl`): on only for sm_90+ GPUs that pass the start-up
probe, off by `MOESERVE_PDL=0`; and the L2 prefetches it allows, whose addresses are checked under the
interpreter with the PTX instruction replaced by a recorder: every address inside the weight's arrays, every line
of what the launch reads covered.

That every kernel waits for its predecessor before touching global memory is checked on the compiled SASS
(`test_triton_sm90.py`); off the GPU the prologue is compiled out and every other triton test runs without it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from moeserve.gguf.quants import random_quant_bytes  # noqa: E402
from moeserve.gguf.reader import PackedTensor  # noqa: E402
from moeserve.kernels.moe import route  # noqa: E402
from moeserve.kernels.triton import pdl  # noqa: E402
from moeserve.kernels.triton.fused_moe import TritonMoE  # noqa: E402
from moeserve.kernels.triton.packing import PackedWeight, pack_weight  # noqa: E402
from moeserve.kernels.triton.qmatmul import TritonLinear, qmatmul  # noqa: E402


def test_off_without_a_hopper_gpu() -> None:
    assert pdl.pdl(torch.device("cpu")) == {"PDL": False}
    assert not pdl.pdl_enabled(torch.device("cpu"))


def test_on_for_sm90_unless_the_environment_says_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "_capable", lambda device: True)
    monkeypatch.setattr(pdl, "_LAUNCH_ARGS", {})  # the per-device answers cached by earlier launches
    monkeypatch.delenv("MOESERVE_PDL", raising=False)
    assert pdl.pdl(torch.device("cpu")) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv("MOESERVE_PDL", "0")
    assert pdl.pdl(torch.device("cpu")) == {"PDL": False}


def test_a_failing_probe_turns_it_off(caplog: pytest.LogCaptureFixture) -> None:
    """The start-up probe (a counted chain of PDL launches, eager and in a CUDA graph) reports failure as False
    with a warning, never as an exception: here there is no CUDA device at all."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert pdl._probe(torch.device("cuda")) is False
    assert "programmatic dependent launch off" in caplog.text


# --------------------------------------------------------------------------------------------
# the prefetches' addresses, under the interpreter: `prefetch` (inline PTX) replaced by a recorder
# --------------------------------------------------------------------------------------------

QUANT = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS, QT.F16, QT.BF16]
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="records the prefetches of CPU tensors under Triton's interpreter")


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """PDL switched on for CPU tensors, its two instructions made no-ops and every prefetched address recorded."""
    seen: list[np.ndarray] = []
    monkeypatch.setattr(pdl, "prefetch", lambda p: seen.append(np.asarray(p.handle.data).ravel().copy()))
    monkeypatch.setattr(pdl, "gdc_launch_dependents", lambda: None)
    monkeypatch.setattr(pdl, "gdc_wait", lambda: None)
    monkeypatch.setattr(pdl, "_capable", lambda device: True)
    monkeypatch.setattr(pdl, "_LAUNCH_ARGS", {})
    return seen


def _arrays(pw: PackedWeight) -> dict[str, tuple[int, int]]:
    return {f: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
            for f in ("qs", "qh", "sc", "mn", "d", "dm") if (t := getattr(pw, f)) is not None}


def _lines(lo: int, hi: int) -> set[int]:
    return set(range(lo // 128, (hi - 1) // 128 + 1))


def _check(addresses: np.ndarray, spans: dict[str, tuple[int, int]], must_cover: dict[str, tuple[int, int]]) -> None:
    inside = np.zeros(len(addresses), dtype=bool)
    for lo, hi in spans.values():
        inside |= (addresses >= lo) & (addresses < hi)
    assert inside.all(), "a prefetch outside the weight's arrays"
    hit = set((addresses // 128).tolist())
    for name, (lo, hi) in must_cover.items():
        assert _lines(lo, hi) <= hit, f"lines of {name} not prefetched"


@interpreted
@pytest.mark.parametrize("qt", QUANT, ids=lambda q: q.name)
def test_matmul_prefetches_exactly_its_weight(qt: QT, recorded: list[np.ndarray]) -> None:
    """q/k/v-style products (decode rows with split K, and a batched-decode GEMM tile) prefetch only addresses
    inside their weight's arrays and every line of them, and compute what they compute without PDL."""
    k = 512
    w = PackedTensor("w", qt, (96, k), torch.from_numpy(random_quant_bytes(qt, (96, k), np.random.default_rng(1))))
    pw = pack_weight(w)
    for m, split in ((1, 2), (37, 1)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        recorded.clear()
        y = qmatmul(x, pw, split_k=split)
        _check(np.concatenate(recorded), _arrays(pw), _arrays(pw))
        pdl._LAUNCH_ARGS.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MOESERVE_PDL", "0")
            assert torch.equal(qmatmul(x, pw, split_k=split), y)


@interpreted
def test_moe_prefetches_the_router_and_its_experts_down_rows(recorded: list[np.ndarray]) -> None:
    """A decode step's routing launch prefetches its router rows; gate/up then prefetches exactly the down rows of
    the experts the token was routed to (and nothing else)."""
    E, H, I, top_k = 8, 256, 256, 2

    def weight(qt: QT, shape: tuple[int, ...], seed: int) -> PackedTensor:
        raw = random_quant_bytes(qt, shape, np.random.default_rng(seed), scale=shape[-1] ** -0.5)
        return PackedTensor(f"w{seed}", qt, shape, torch.from_numpy(raw))

    router = TritonLinear(weight(QT.F32, (E, H), 0))
    moe = TritonMoE(router, weight(QT.Q4_K, (E, I, H), 1), weight(QT.Q4_K, (E, I, H), 2),
                    weight(QT.Q6_K, (E, H, I), 3), top_k, True)
    h = torch.randn(1, H, generator=torch.Generator().manual_seed(0))
    recorded.clear()
    moe(h)
    addresses = np.concatenate(recorded)
    rw = moe.router_weight
    router_span = {"router": (rw.data_ptr(), rw.data_ptr() + rw.numel() * rw.element_size())}
    down = _arrays(moe.down)
    chosen = route(router(h), top_k, True)[1][0].tolist()
    rows = {f"{name} of expert {e}": (lo + (hi - lo) * e // E, lo + (hi - lo) * (e + 1) // E)
            for name, (lo, hi) in down.items() for e in chosen}
    _check(addresses, router_span | down, router_span | rows)
    others = [e for e in range(E) if e not in chosen]
    qs_lo, qs_hi = down["qs"]
    per_expert = (qs_hi - qs_lo) // E
    untouched = set().union(*(_lines(qs_lo + per_expert * e + 128, qs_lo + per_expert * (e + 1) - 128)
                              for e in others))
    assert not untouched & set((addresses // 128).tolist()), "down rows of an expert the token does not use"


@interpreted
def test_whole_model_is_the_same_with_pdl(make_model, recorded: list[np.ndarray],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel's PDL branches (the two instructions as no-ops here, the prefetches recorded) leave a forward's
    logits and a greedy decode bit-identical to the launches without PDL: prefill, decode, all packed types of the
    mixed parity model."""
    from moeserve import LLM, SamplingParams
    from tests.test_parity_hf import CONFIGS

    path = make_model("pdl-mixed", n_layers=2, vocab_size=384, **CONFIGS["hd128-gqa4-e8k2-untied-mixed"])
    prompt = np.random.default_rng(3).integers(0, 250, 12).tolist()
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    runs = []
    for setting in ("0", "1"):
        monkeypatch.setenv("MOESERVE_PDL", setting)
        llm = LLM(str(path), kernels="triton", device="cpu", warmup=False)
        runs.append((llm.logits(prompt), llm.generate([prompt], sp)[0].outputs[0].token_ids))
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert recorded, "the PDL launches prefetched nothing"
