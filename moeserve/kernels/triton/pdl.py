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

Between the two a kernel may touch what no earlier kernel writes: the matrix kernels whose rows are known from
their program ids (q/k/v, o_proj, attn_v, the router; at most `PREFETCH_MAX_BYTES` a launch, so not lm_head)
ask L2 for their weight bytes (`prefetch_span`, `prefetch.global.L2`), so the weights stream in while the small
kernel before them (a norm, the attention of one sequence) still runs, and their first loads hit L2. A
prefetch moves no data into registers and is no memory access in the ordering sense; the weights are never
written. (The MoE gate/up kernel prefetches its experts' down rows after its wait: `fused_moe`.)

On by default on sm_90+ GPUs whose driver passes a probe at the backend's start (`_probe`: a chain of PDL
launches, eager and captured in a CUDA graph, must count to the right number; otherwise PDL stays off with a
warning and the kernels run as before); `MOESERVE_PDL=0` turns it off (A/B in `benchmarks/gpu_bench.py`). Off
the GPU (Triton's interpreter) `PDL` is False and the branches are compiled out.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    _HAS_GDC = True
except ImportError:  # triton before 3.3 has no grid dependency control: PDL stays off, the branches compile out
    _HAS_GDC = False

    @triton.jit
    def gdc_launch_dependents():  # noqa: D103
        pass

    @triton.jit
    def gdc_wait():  # noqa: D103
        pass

__all__ = ["PREFETCH_MAX_BYTES", "pdl", "pdl_enabled", "pdl_enter", "pdl_release", "pdl_wait", "prefetch",
           "prefetch_row_range", "prefetch_span"]


log = logging.getLogger("moeserve")


@functools.cache
def _capable(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.0 or later (griddepcontrol is an sm_90 instruction) on which
    PDL launches work (`_probe`)."""
    return (_HAS_GDC and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
            and _probe(device))


_PROBE_CHAIN = 32


def _probe(device: torch.device) -> bool:
    """Whether a chain of PDL launches, each adding one to a counter after its predecessor, counts right: two
    eager launches, then a CUDA graph of `_PROBE_CHAIN` replayed once. Any error or a lost update turns PDL off
    (with a warning) instead of failing every forward."""
    try:
        with torch.cuda.device(device):
            x = torch.zeros(1, dtype=torch.int32, device=device)
            for _ in range(2):
                _probe_kernel[(4,)](x, PDL=True, launch_pdl=True)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(_PROBE_CHAIN):
                    _probe_kernel[(4,)](x, PDL=True, launch_pdl=True)
            graph.replay()
            torch.cuda.synchronize(device)
            got = int(x.item())
        if got == 4 * (2 + _PROBE_CHAIN):
            return True
        log.warning("programmatic dependent launch off on %s: the probe counted %d, not %d", device, got,
                    4 * (2 + _PROBE_CHAIN))
    except Exception as exc:  # an old driver, a capture that rejects the launch attribute, ...
        log.warning("programmatic dependent launch off on %s: %s: %s", device, type(exc).__name__, exc)
    return False


def pdl_enabled(device: torch.device) -> bool:
    """Whether launches on `device` use PDL: an sm_90+ GPU, unless the environment says `MOESERVE_PDL=0`."""
    if os.environ.get("MOESERVE_PDL", "1") == "0":
        return False
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one probe per card, however the device is named
        device = torch.device("cuda", torch.cuda.current_device())
    return _capable(device)


_LAUNCH_ARGS: dict[tuple[torch.device, str | None], dict[str, bool]] = {}


def pdl(device: torch.device) -> dict[str, bool]:
    """The keyword arguments of a launch on `device`: the kernels' `PDL` constexpr and, when on, `launch_pdl`
    (looked up once per device and setting: eager prefill launches hundreds of kernels per forward)."""
    key = (device, os.environ.get("MOESERVE_PDL"))
    args = _LAUNCH_ARGS.get(key)
    if args is None:
        args = _LAUNCH_ARGS[key] = {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}
    return args


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A kernel's first statement (module docstring): allow the next launch, then wait for the previous kernel."""
    pdl_release(PDL)
    pdl_wait(PDL)


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """The next kernel may be launched (`pdl_enter`'s first half, for kernels that prefetch before they wait)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel to finish, its writes visible (`pdl_enter`'s second half)."""
    if PDL:
        gdc_wait()


@triton.jit
def _probe_kernel(x_ptr, PDL: tl.constexpr):
    """x += 1 per program after the previous kernel (an atomic: the programs of one launch share x)."""
    pdl_enter(PDL)
    tl.atomic_add(x_ptr, 1)


PREFETCH_MAX_BYTES = 16 << 20
"""A launch prefetches at most this much (a third of an H100's 50 MB L2), so that prefetched lines are still there
when the loads come; larger weights (lm_head: 255 MB) stream as before."""

_LANES: tl.constexpr = tl.constexpr(128)


@triton.jit
def prefetch(p):
    """Ask L2 for the 128-byte line of each address in `p` (`prefetch.global.L2`). GPU only: inline PTX, which
    the interpreter cannot run (callers are under a `PDL` branch)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_span(ptr, first, last):
    """The lines that hold elements `first`..`last` of `ptr`'s array, one line per lane per trip."""
    ESIZE: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    start = (ptr + first).to(tl.pointer_type(tl.uint8))
    nbytes = (last - first + 1) * ESIZE
    for i in range(0, nbytes, _LANES * 128):
        prefetch(start + tl.minimum(i + tl.arange(0, _LANES) * 128, nbytes - 1))


@triton.jit
def prefetch_row_range(ptr, rows, stride, lo, hi):
    """The lines that hold bytes `lo`..`hi - 1` of each row in `rows` (a byte array with `stride` bytes a row)."""
    base = ptr + rows * stride
    for b in range(lo, hi, 128):
        prefetch(base + b)
    prefetch(base + hi - 1)  # the last line, when lo is not at a line start
