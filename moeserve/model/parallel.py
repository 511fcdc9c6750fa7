"""Tensor and expert parallelism: which slice of every weight a rank holds, and the collectives.

A model split over N ranks (processes, one per device or per core group) runs the same decoder on
every rank; each rank holds only its part of the big weights and the layers meet in collectives
(`torch.distributed`: gloo on CPUs, NCCL on GPUs):

* **attention, tensor parallel** (Megatron): rank r holds its q heads and the KV heads they read
  (split when there are at least N KV heads, else each rank keeps the one its q heads share), the
  matching rows of q/k/v and columns of o_proj. Its partial o_proj outputs are summed (all-reduce).
  Its KV pool holds only its KV heads.
* **MoE, tensor parallel**: every expert's intermediate dimension is cut; rank r holds rows of
  gate/up and the matching columns of down, and the partial FFN outputs are summed (all-reduce).
* **MoE, expert parallel** (`expert_parallel`): rank r holds whole experts [e0, e1) (vLLM's expert
  map); every rank routes every token (the router is replicated), runs only the (token, expert)
  pairs that land on its experts, and the outputs are summed (all-reduce).
* **vocabulary**: rank r holds rows [v0, v1) of the lm_head; its logit columns are gathered on rank 0,
  which samples. A plain greedy step (`argmax`) gathers only each rank's best (logit, token) per row.
  The embedding is replicated: a lookup reads T rows, a split one would cost an all-reduce per step.

On CPUs (gloo) a rank waits for a forward collective by polling it and yielding its core rather than
sleeping in it: on a VM an idle vCPU takes hundreds of µs to wake, which, at two collectives per layer,
is a large share of a decode step.

Column cuts of a quantized matrix fall on its blocks (32 or 256 weights): a split is as even as
the blocks allow, and a rank may get an empty share of an expert's columns (it then adds zero).
When no split of the heads keeps every o_proj cut on a block, attention is replicated instead
(every rank computes it whole; `Shard.attention_split` says which was chosen).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moeserve.gguf.quants import block_info
from moeserve.gguf.reader import PackedTensor
from moeserve.kernels.moe import route
from moeserve.profiler import stage


@dataclass
class Shard:
    """This rank's place in the group: what it holds follows from (rank, size) and the two switches."""

    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # MoE: whole experts per rank (else every expert's intermediate dim is cut)
    split_attention: bool = True  # attention heads per rank (else every rank computes attention whole)
    group: Any = None  # the torch.distributed process group of the forward's collectives
    attention_split: bool = field(default=False, init=False)  # what the loader could do (block boundaries)
    held_bytes: int = field(default=0, init=False)  # weight bytes this rank holds (its slices and the replicas)

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial result (float32; every rank gets the same bits)."""
        with stage("all_reduce"):
            x = x.float().contiguous()
            wait_collective(dist.all_reduce(x, group=self.group, async_op=True), x)
            return x

    def gather_columns(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Rank 0 gets every rank's columns side by side (the others get their own back; they drop it)."""
        with stage("gather"):
            x = x.float().contiguous()
            if self.rank != 0:
                wait_collective(dist.gather(x, None, dst=0, group=self.group, async_op=True), x)
                return x
            parts = [x.new_empty(x.shape[0], w) for w in widths]
            wait_collective(dist.gather(x, parts, dst=0, group=self.group, async_op=True), x)
            return torch.cat(parts, dim=1)


def wait_collective(work: Any, x: torch.Tensor) -> None:
    """Wait for a forward collective: on a CPU by polling it with the core yielded (a waiting rank whose core
    stays awake answers at once, where an idle vCPU of a VM takes hundreds of µs to wake; gloo's timeout still
    ends a collective whose peer is gone), on a GPU by the stream as usual. Raises what the collective raised."""
    if x.device.type == "cpu":
        while not work.is_completed():
            os.sched_yield()
    work.wait()


# ---------------------------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------------------------


def split(n: int, parts: int, unit: int = 1) -> list[int]:
    """Boundaries [0, b1, ..., n] cutting n into `parts` nearly equal pieces, each boundary a multiple of `unit`."""
    cuts = [min(n, int(n * i / parts / unit + 0.5) * unit) for i in range(parts + 1)]
    cuts[-1] = n
    return cuts


def col_unit(w: PackedTensor) -> int:
    """The weights per block of `w`'s type: a column cut must fall on a multiple of it."""
    return block_info(w.qtype)[0]


def resident(w: PackedTensor) -> PackedTensor:
    """`w`'s bytes copied into anonymous memory advised to 2 MiB pages, for a rank on a CPU.

    One process maps the whole file and reads it into huge pages (`GGUFFile.read_into_memory`: a file-page
    fault costs ~15 µs on this VM, and experts are touched at random). A rank reads only its slices, so it
    copies each one the same way: the same memory layout as one process, at 1/N of the bytes."""
    import mmap

    import numpy as np

    n = w.data.numel()
    if w.data.device.type != "cpu" or n < (1 << 21):
        return PackedTensor(w.name, w.qtype, w.shape, w.data.clone())
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    data = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8)).view(w.data.shape)
    data.copy_(w.data)
    return PackedTensor(w.name, w.qtype, w.shape, data)


def take_rows(w: PackedTensor, lo: int, hi: int, axis: int = 0) -> PackedTensor:
    """Rows [lo, hi) along `axis` (an output dimension): whole rows of blocks, a copy of just those bytes."""
    index = [slice(None)] * w.data.dim()
    index[axis] = slice(lo, hi)
    shape = list(w.shape)
    shape[axis] = hi - lo
    return PackedTensor(w.name, w.qtype, tuple(shape), w.data[tuple(index)].contiguous())


def take_cols(w: PackedTensor, lo: int, hi: int) -> PackedTensor:
    """Columns [lo, hi) of the last (input) dimension; both must be multiples of the block size."""
    bs, ts = block_info(w.qtype)
    if lo % bs or hi % bs:
        raise ValueError(f"{w.name}: columns [{lo}, {hi}) do not fall on its {bs}-weight blocks")
    data = w.data[..., lo // bs * ts: hi // bs * ts].contiguous()
    return PackedTensor(w.name, w.qtype, (*w.shape[:-1], hi - lo), data)


@dataclass
class HeadPlan:
    """The attention heads of one rank: q heads [q0, q1) and KV heads [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int


def plan_heads(n_heads: int, n_kv: int, head_dim: int, o_unit: int, shard: Shard) -> HeadPlan | None:
    """This rank's heads, or None when they cannot be split (attention is then replicated).

    Ranks cut the q heads evenly; with at least `size` KV heads the cut also follows KV groups, with
    fewer each rank keeps the one KV head its q heads share (replicated KV). Every cut of o_proj's
    columns (head * head_dim) must fall on its blocks."""
    size, group = shard.size, n_heads // n_kv
    if not shard.split_attention or size == 1 or n_heads % size:
        return None
    per = n_heads // size
    if n_kv >= size:
        if n_kv % size:
            return None
    elif group % per:  # a rank's q heads must share one KV head
        return None
    if (per * head_dim) % o_unit:
        return None
    q0 = shard.rank * per
    return HeadPlan(q0, q0 + per, q0 // group, (q0 + per - 1) // group + 1)


# ---------------------------------------------------------------------------------------------
# kernels wrapped with their collective
# ---------------------------------------------------------------------------------------------


class Reduced:
    """`all_reduce(inner(x))`: a row-parallel linear (o_proj) or an FFN of cut experts."""

    def __init__(self, inner: Any, shard: Shard) -> None:
        self.inner, self.shard = inner, shard
        self.in_features = getattr(inner, "in_features", None)
        self.out_features = getattr(inner, "out_features", None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.all_reduce(self.inner(x))


class ZeroFFN:
    """A rank whose share of every expert's columns is empty: it adds nothing before the all-reduce."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros(h.shape[0], h.shape[1], dtype=torch.float32, device=h.device)


class VocabHead:
    """Logit columns [cuts[r], cuts[r+1]) on rank r, gathered side by side on rank 0 (which samples)."""

    def __init__(self, inner: Any, cuts: list[int], shard: Shard,
                 pick: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """`pick`: the backend's row-wise argmax (first maximum, NaN wins), for `argmax`."""
        self.inner, self.shard, self.pick = inner, shard, pick
        self.widths = [b - a for a, b in zip(cuts, cuts[1:])]
        self.v0 = cuts[shard.rank]
        self.in_features, self.out_features = getattr(inner, "in_features", None), cuts[-1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.shard.gather_columns(self.inner(x).float(), self.widths)

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy token ids [R] on rank 0 from each rank's best (logit, token) per row: 2 numbers per row cross
        instead of V/N logits. The first maximum over the whole vocabulary wins, as in one process: ranks hold
        ascending vocabulary ranges and torch.argmax takes the first of equal maxima (a NaN counts as +inf)."""
        logits = self.inner(x).float()
        idx = self.pick(logits)
        best = torch.stack([logits.gather(1, idx[:, None])[:, 0], (idx + self.v0).float()], dim=1)  # ids < 2^24
        every = self.shard.gather_columns(best, [2] * self.shard.size)  # rank 0: [R, 2N] (value, id) pairs
        values, ids = every[:, 0::2], every[:, 1::2]
        winner = torch.nan_to_num(values, nan=float("inf")).argmax(dim=1, keepdim=True)
        return ids.gather(1, winner)[:, 0].long()


class ExpertParallelMoE:
    """Route every token over all experts, run the pairs that land on this rank's experts [e0, e1), sum.

    Each (token, expert) pair on this rank becomes one row of a top-1 call of the local MoE kernel
    (`mix`), so a rank computes only its share of the pairs whatever backend made the kernel."""

    def __init__(self, router: Any, local: Any, e0: int, e1: int, top_k: int, renormalize: bool,
                 shard: Shard) -> None:
        self.router, self.local, self.e0, self.e1 = router, local, e0, e1
        self.top_k, self.renormalize, self.shard = top_k, renormalize, shard

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        with stage("router"):
            weights, experts = route(self.router(h), self.top_k, self.renormalize)
            mine = (experts >= self.e0) & (experts < self.e1)
            token, slot = mine.nonzero(as_tuple=True)
        out = torch.zeros(h.shape[0], h.shape[1], dtype=torch.float32, device=h.device)
        if token.numel():
            y = self.local.mix(h[token], weights[token, slot][:, None], (experts[token, slot] - self.e0)[:, None])
            out.index_add_(0, token, y.float())
        return self.shard.all_reduce(out)


def held_bytes(*tensors: PackedTensor | torch.Tensor | None) -> int:
    return sum(t.nbytes if isinstance(t, PackedTensor) else t.numel() * t.element_size()
               for t in tensors if t is not None)


def describe(shard: Shard) -> str:
    """One line for logs and banners: what this group splits."""
    if not shard.parallel:
        return "1 process"
    attn = "attention split by heads" if shard.attention_split else "attention replicated"
    moe = "experts split (expert parallel)" if shard.expert_parallel else "expert FFNs split (tensor parallel)"
    return f"{shard.size} ranks: {attn}, {moe}, lm_head split by vocabulary"


__all__ = ["ExpertParallelMoE", "HeadPlan", "Reduced", "Shard", "VocabHead", "ZeroFFN",
           "col_unit", "describe", "held_bytes", "plan_heads", "resident", "split", "take_cols", "take_rows"]
