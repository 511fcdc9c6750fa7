"""The soak harness (`scripts/soak.py`, `make soak`) in quick mode: a real server process on loopback, 8 streaming
clients for 12 s with random disconnects, a KV pool small enough to preempt, batch-invariant kernels. Checks the
harness itself and the invariants the full run reports: no 5xx, no mid-stream error, greedy outputs equal to their
solo runs, the KV pool back to no block in use once the clients stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status for the server's RSS")
def test_soak_quick_mode(tmp_path):
    from moeserve.kernels.cpu import build

    try:
        build.load()
    except Exception as exc:  # the soak server runs the cpu kernels (batch-invariant mode)
        pytest.skip(f"native cpu kernels unavailable: {exc}")
    out = tmp_path / "soak.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "12", "--clients", "8",
           "--num-kv-blocks", "64", "--max-tokens", "48", "--max-prompt-words", "80", "--disconnect-fraction", "0.3",
           "--drain-timeout", "30", "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads(out.read_text())
    detail = json.dumps({k: v for k, v in s.items() if k != "server_log_tail"}, indent=1)[:4000] + s["server_log_tail"]
    assert res.returncode == 0 and s["ok"], detail
    assert s["http_5xx"] == 0 and s["stream_errors"] == 0 and s["transport_errors"] == 0, detail
    assert s["requests_completed"] > 20 and s["completion_tokens"] > 0, detail
    assert s["disconnects"] > 0, detail
    assert s["greedy_checked"] > 0 and s["mismatches_vs_solo"] == 0, detail
    assert s["preemptions"] > 0, detail  # 64 blocks of 16 tokens for 8 clients: the scheduler must preempt
    assert s["kv_blocks_used_end"] == 0 and s["kv_blocks_free_end"] == s["kv_blocks_total"], detail
    assert s["health_latency"]["n"] >= 10 and s["health_errors"] == 0, detail
    assert s["rss_start_kib"] and s["rss_end_kib"], detail
    assert s["server_alive"], detail
