"""One model over several processes: starting the ranks, and rank 0 driving the others.

Rank 0 is the engine: it schedules, runs its share of every forward and samples. Every other rank
is a worker that loads its own slices of the weights (`model/parallel.py`), keeps a KV pool of its own
heads with the same block numbering, and replays each step rank 0 sends it (nano-vllm's and vLLM's
pattern): the step goes out as one flat int64 tensor over a control group, then all ranks run the
same forward and meet in its collectives.

* `moeserve ... --tensor-parallel-size N` (or `LLM(..., tensor_parallel_size=N)`) starts ranks 1..N-1 on
  this machine itself (`torch.multiprocessing`, spawn) and rendezvous over a local TCP port.
* `torchrun --nnodes M --nproc-per-node K ... -m moeserve serve MODEL --tensor-parallel-size M*K` runs one
  process per rank anywhere (env:// rendezvous: MASTER_ADDR, RANK, WORLD_SIZE); rank 0 serves, the others
  become workers.

Failure: a collective in a forward waits at most `timeout` seconds (the process group's timeout); a rank
that dies closes its sockets, and the others' next collective fails at once. Either way the survivors
raise `ParallelError` naming the group, and workers exit with one line on stderr — never a hang. Between
steps a worker waits on a separate control group without that timeout (an idle server is not a failure).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moeserve.errors import MoeServeError, RequestError
from moeserve.model.parallel import Shard

STOP, STEP, FULL, HIDDEN, START, PROFILE = 0, 1, 2, 3, 4, 5  # what rank 0 tells the workers
MESSAGE = 1024  # ints in a step message's first broadcast: a decode step of up to ~100 sequences fits
_KV_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class ParallelError(MoeServeError):
    """A rank of the parallel group died or timed out: the group cannot go on."""


@dataclass
class ParallelConfig:
    """How one model is split over processes (`LLM(...)` and the CLI flags of the same names)."""

    tensor_parallel_size: int = 1  # ranks (processes); 1 = no parallelism
    expert_parallel: bool = False  # MoE: whole experts per rank instead of cutting every expert's FFN
    split_attention: bool = True  # attention heads per rank (False: every rank computes attention whole)
    timeout: float = 60.0  # seconds a collective may wait for the other ranks before the group fails
    threads: int | None = None  # torch threads per rank (default: this process's cores / ranks)

    def validate(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise RequestError(f"tensor_parallel_size must be a whole number >= 1, got {self.tensor_parallel_size!r}")
        if not self.timeout > 0:
            raise RequestError(f"the collective timeout must be > 0 seconds, got {self.timeout!r}")


def torchrun_env() -> tuple[int, int] | None:
    """(rank, world size) when launched by torchrun (or any env:// launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Group:
    """This process's membership: its shard (forward collectives) and the control group (steps)."""

    shard: Shard
    control: Any


def join(rank: int, size: int, cfg: ParallelConfig, device: torch.device, init_method: str,
         workers: Workers | None = None) -> Group:
    """Join the process group: NCCL for the forward on GPUs, gloo on CPUs; gloo for the step messages.

    `init_method` is env:// (torchrun) or tcp://127.0.0.1:PORT (ranks this process started, `workers`:
    rank 0 hosts the rendezvous and stops waiting as soon as one of them has died)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=cfg.timeout)
    try:
        if init_method.startswith("tcp://"):
            host, port = init_method[len("tcp://"):].rsplit(":", 1)
            store = dist.TCPStore(host, int(port), size, is_master=rank == 0, timeout=timeout,
                                  wait_for_workers=False)
            store.set(f"moeserve/alive/{rank}", "1")
            if rank == 0:
                _wait_for(store, size, workers, cfg.timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    except ParallelError:
        raise
    except Exception as exc:
        raise ParallelError(f"rank {rank} of {size} could not join the group at {init_method}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return Group(Shard(rank, size, cfg.expert_parallel, cfg.split_attention), control)


def _wait_for(store: Any, size: int, workers: Workers | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    keys = [f"moeserve/alive/{r}" for r in range(1, size)]
    while True:
        if store.check(keys):
            return
        if workers is not None and (dead := workers.dead()):
            raise ParallelError(f"{', '.join(dead)} exited before joining the group (its error is above)")
        if time.monotonic() > deadline:
            raise ParallelError(f"the other ranks did not join within {timeout:g} s")
        time.sleep(0.05)


def held_by_rank(group: Group) -> list[int]:
    """Every rank's weight bytes (after loading; every rank calls it): what `LLM.rank_weight_bytes` reports."""
    t = torch.tensor([group.shard.held_bytes], dtype=torch.long)
    out = [torch.zeros(1, dtype=torch.long) for _ in range(group.shard.size)]
    try:
        dist.all_gather(out, t, group=group.control)
    except RuntimeError as exc:  # a rank failed to load its shard (its own error line is above)
        raise ParallelError(f"a rank of the parallel group failed while loading: {str(exc).splitlines()[0]}") \
            from exc
    return [int(x) for x in out]


def leave() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()


class Driver:
    """Rank 0's side: send each step to the workers, then run it (under one lock: steps never interleave)."""

    def __init__(self, group: Group) -> None:
        import threading

        self.group, self.lock = group, threading.Lock()
        self.closed = False

    def _send(self, op: int, payload: list[int]) -> None:
        """One broadcast of [op, n, payload...] padded to MESSAGE ints (a decode step fits); the rest, if any,
        in a second one (every collective costs a few hundred µs of latency on gloo)."""
        ctl = self.group.control
        head = torch.zeros(MESSAGE, dtype=torch.long)
        first = payload[:MESSAGE - 2]
        head[0], head[1] = op, len(payload)
        head[2:2 + len(first)] = torch.tensor(first, dtype=torch.long)
        dist.broadcast(head, 0, group=ctl)
        if len(payload) > len(first):
            dist.broadcast(torch.tensor(payload[len(first):], dtype=torch.long), 0, group=ctl)

    @contextlib.contextmanager
    def step(self, op: int, payload: list[int]) -> Iterator[None]:
        with self.lock:
            if self.closed:
                raise ParallelError("the parallel group has stopped")
            try:
                self._send(op, payload)
                yield
            except ParallelError:
                raise
            except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection, or a collective timed out
                self.closed = True
                raise ParallelError(f"the parallel group failed ({self.group.shard.size} ranks): "
                                    f"{str(exc).splitlines()[0]}") from exc

    def profile(self, rows: int, sampled: int, kv_dtype: torch.dtype,
                utilization: float) -> contextlib.AbstractContextManager[None]:
        """Every rank runs the same dummy step (`runner.profile_activations`) with rank 0, meeting in its
        collectives, then works out its own pool budget (`runner.pool_budget`); inside this, rank 0 runs the step
        too and calls `smallest` with its budget, which every rank meets."""
        return self.step(PROFILE, [rows, sampled, _KV_DTYPES.index(kv_dtype), round(utilization * 1e6)])

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value` (rank 0's here, the workers' in `serve_steps`)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group.control)
        return int(t)

    def start(self, num_blocks: int, kv_dtype: torch.dtype) -> None:
        """Tell the workers the KV pool's size and type (every rank numbers its blocks alike)."""
        with self.step(START, [num_blocks, _KV_DTYPES.index(kv_dtype)]):
            pass

    def stop(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            with contextlib.suppress(Exception):
                self._send(STOP, [])


def serve_steps(model: Any, control: Any) -> None:
    """A worker's loop: replay rank 0's steps until it says stop (START: a new engine, with a new KV pool)."""
    from moeserve.engine.paged_cache import KVPool
    from moeserve.engine.runner import HostStep, ModelRunner, pool_budget, profile_activations

    runner = None
    while True:
        head = torch.empty(MESSAGE, dtype=torch.long)
        dist.broadcast(head, 0, group=control)
        op, n = int(head[0]), int(head[1])
        payload = head[2:2 + min(n, MESSAGE - 2)].tolist()
        if n > MESSAGE - 2:
            buf = torch.empty(n - (MESSAGE - 2), dtype=torch.long)
            dist.broadcast(buf, 0, group=control)
            payload += buf.tolist()
        if op == STOP:
            return
        if op == START:
            runner = None  # the old pool goes before the new one is allocated
            pool = KVPool(model.cache_config, payload[0], _KV_DTYPES[payload[1]], model.device)
            runner = ModelRunner(model, pool, enforce_eager=True)
        elif op == PROFILE:  # (an out-of-memory here ends this rank: rank 0's step then fails with the group)
            peak = profile_activations(model, _KV_DTYPES[payload[2]], payload[0], payload[1])
            t = torch.tensor([pool_budget(model, payload[3] / 1e6, peak)], dtype=torch.long)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control)
        elif op == STEP and runner is not None:
            runner.run(HostStep.unpack(payload))
        elif op in (FULL, HIDDEN) and runner is not None:
            runner.full(payload, hidden=op == HIDDEN)
        else:
            raise ParallelError(f"unexpected message {op} from rank 0")


@dataclass
class WorkerSpec:
    """What a worker needs to load its shard as rank 0 loads its own."""

    model: str
    kernels: str | None
    device: str
    max_model_len: int
    parallel: ParallelConfig


def worker_main(spec: WorkerSpec, rank: int, size: int, init_method: str) -> None:
    """Entry point of ranks 1..N-1: join, load this rank's slices, replay steps; exit 1 with one line on failure."""
    try:
        run_worker(spec, rank, size, init_method)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # one clear line, no traceback: rank 0 reports the group's failure
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"moeserve rank {rank}/{size}: {msg}", file=sys.stderr, flush=True)
        leave()
        os._exit(1)
    leave()


def run_worker(spec: WorkerSpec, rank: int, size: int, init_method: str) -> None:
    from moeserve.gguf.config import load_config
    from moeserve.gguf.reader import GGUFFile
    from moeserve.kernels.select import select_backend
    from moeserve.model.decoder import load_decoder

    device = torch.device(spec.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    torch.set_num_threads(spec.parallel.threads or max(1, len(os.sched_getaffinity(0)) // size))
    group = join(rank, size, spec.parallel, device, init_method)
    backend = select_backend(spec.kernels, device)
    f = GGUFFile(spec.model)
    model = load_decoder(f, backend, load_config(f), max_positions=spec.max_model_len, shard=group.shard)
    held_by_rank(group)
    serve_steps(model, group.control)


class Workers:
    """Ranks 1..N-1 started on this machine (spawned processes) and their teardown."""

    def __init__(self, spec: WorkerSpec, size: int, init_method: str) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, args=(spec, r, size, init_method), daemon=True,
                                  name=f"moeserve-rank{r}") for r in range(1, size)]
        for p in self.procs:
            p.start()

    def dead(self) -> list[str]:
        return [f"{p.name} (exit code {p.exitcode})" for p in self.procs if not p.is_alive()]

    def join(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(1.0)
