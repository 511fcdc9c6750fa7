"""Per-stage wall-clock profile of the forward pass (the seed's FERRUM_DECODE_OP_PROFILE).

Layers wrap their work in `stage("attention")`, `stage("router")`, ...; when profiling is off
(the default) a stage costs one attribute check. `moeserve bench --profile` turns it on and
prints the breakdown separately for prefill and decode steps.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

STAGES = ("attention", "router", "expert_gate", "expert_up", "expert_down", "weighted_sum", "experts_fused",
          "moe_fused", "lm_head")


class Profiler:
    def __init__(self) -> None:
        self.enabled = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._sync = None

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


PROFILER = Profiler()
stage = PROFILER.stage
