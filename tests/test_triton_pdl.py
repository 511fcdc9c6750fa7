"""Programmatic dependent launch (`moeserve.kernels.triton.pdl`): on only for sm_90+ GPUs that pass the start-up
probe, off by `MOESERVE_PDL=0`.

That every kernel waits for its predecessor before touching global memory is checked on the compiled SASS
(`test_triton_sm90.py`); off the GPU the prologue is compiled out and every other triton test runs without it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moeserve.kernels.triton import pdl  # noqa: E402


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
