"""Programmatic dependent launch (PDL, sm_90 and later): each kernel's launch overlaps the end of the one before.

A decode step is ~450 small kernels in a row on one stream (48 layers x 9, `docs/benchmarks.md`), and each
normally starts only after the previous one has finished and the GPU has then processed its launch: a gap of
the order of a microsecond per kernel even inside a CUDA graph, for kernels whose work is a few microseconds.
With PDL (`launch_pdl=True`, CUDA's programmatic stream serialization) a kernel may be launched while the
previous one still runs. Every kernel of this backend then starts with `pdl_enter`:

1. `gdc_launch_dependents`: the next kernel may be launched now (once every program of this one has said so);
2. `gdc_wait`: returns when the previous kernel has finished and its writes are visible.

Nothing is read or written before the wait, so the order of memory operations is exactly the stream's (and by
induction every earlier kernel has finished too: the previous one waited for its own predecessor before doing
anything). Only the launch latency is hidden. A kernel that is not launched with PDL (a torch op) is simply
waited for in full, as always; CUDA graphs keep the launch attribute as programmatic edges.

On by default on sm_90+ GPUs; `MOESERVE_PDL=0` turns it off (A/B in `benchmarks/gpu_bench.py`). Off the GPU
(Triton's interpreter) `PDL` is False and the branch is compiled out.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["pdl", "pdl_enter", "pdl_enabled"]


@functools.cache
def _capable(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (griddepcontrol is an sm_90 instruction)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: an sm_90+ GPU, unless the environment says `MOESERVE_PDL=0`."""
    return _capable(torch.device(device)) and os.environ.get("MOESERVE_PDL", "1") != "0"


def pdl(device: torch.device) -> dict[str, bool]:
    """The keyword arguments of a launch on `device`: the kernels' `PDL` constexpr and, when on, `launch_pdl`."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A kernel's first statement (module docstring): allow the next launch, then wait for the previous kernel."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
