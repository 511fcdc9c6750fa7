"""Choosing a kernel backend: `LLM(kernels=...)`, `--kernels`, `$MOESERVE_KERNELS`; the default picks the
best backend for the device (cpu on a CPU, triton on a GPU) (see `kernels/backend.py` for what a backend is).

Batch invariance (`LLM(batch_invariant=True)`, `--batch-invariant`, `$MOESERVE_BATCH_INVARIANT=1`) is chosen here
too, at load: only the cpu backend offers it; asking it of another backend is a `RequestError`."""

from __future__ import annotations

import os

import torch

from moeserve.errors import RequestError
from moeserve.kernels.backend import Backend

BACKENDS = ("auto", "reference", "cpu", "triton")
ALIASES = {"fast": "auto"}  # the name earlier versions used for "the fast kernels of this device"


def requested(name: str | None) -> str:
    """The backend asked for: `name`, else `$MOESERVE_KERNELS`, else "auto" (aliases resolved, not validated)."""
    raw = name if name is not None else os.environ.get("MOESERVE_KERNELS") or "auto"
    return ALIASES.get(raw, raw)


def backend_name(name: str | None, device: torch.device | str) -> str:
    """Resolve `name` (None: `$MOESERVE_KERNELS`, else auto) to a concrete backend for `device`."""
    resolved = requested(name)
    if resolved not in BACKENDS:
        source = "kernels" if name is not None else "$MOESERVE_KERNELS"
        raw = name if name is not None else os.environ.get("MOESERVE_KERNELS")
        raise RequestError(f"{source} must be one of {', '.join(BACKENDS)} (or 'fast'), got {raw!r}")
    if resolved == "auto":
        return "cpu" if torch.device(device).type == "cpu" else "triton"
    if resolved == "cpu" and torch.device(device).type != "cpu":
        raise RequestError(f"the cpu kernels run on the CPU, not on {device}; use device='cpu' or kernels='reference'")
    return resolved


def batch_invariant_requested(value: bool | None) -> bool:
    """`value`, else `$MOESERVE_BATCH_INVARIANT` ("1"/"true"/"yes"/"on": on; unset, "0", "false", "no", "off": off)."""
    if value is not None:
        return bool(value)
    raw = os.environ.get("MOESERVE_BATCH_INVARIANT", "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise RequestError(f"$MOESERVE_BATCH_INVARIANT must be 0 or 1, got {raw!r}")


def select_backend(name: str | None = None, device: torch.device | str = "cpu",
                   batch_invariant: bool = False) -> Backend:
    """The backend `name` names for `device` (see `backend_name`).

    The cpu backend builds its native kernels here: a compiler error is raised (`NativeBuildError`
    with the compiler's message), never swallowed — `kernels='reference'` is the way to run without.
    `batch_invariant`: kernels whose result for a row does not depend on the other rows of the call (the cpu
    backend only; a `RequestError` names the way out for any other).
    """
    resolved = backend_name(name, device)
    if batch_invariant and resolved != "cpu":
        raise RequestError(
            f"batch_invariant is implemented by the cpu backend only, not by {resolved!r} "
            "(torch's float32 matmuls and SDPA change their blocking, hence a row's rounding, with the row count); "
            "use kernels='cpu' on device='cpu', or turn batch_invariant off")
    if resolved == "triton":
        from moeserve.kernels.triton.backend import TritonBackend

        return TritonBackend(device)
    if resolved == "cpu":
        from moeserve.kernels.cpu.backend import CpuBackend

        return CpuBackend(device, batch_invariant=batch_invariant)
    from moeserve.kernels.reference import ReferenceBackend

    return ReferenceBackend(device)
