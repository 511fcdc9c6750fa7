"""Soak test: many streaming clients against one server process on loopback, for a bounded time.

    python scripts/soak.py --seconds 600 --clients 64 --json soak-result.json [--hostile]

Starts `python -m moeserve.server` on 127.0.0.1 (a free port) with a random Qwen3-MoE written by
`moeserve.testing` (2 layers, hidden 256, 8 experts; Q4_K experts), a KV pool small enough that the
scheduler preempts, and batch-invariant kernels (`$MOESERVE_BATCH_INVARIANT=1`, so a greedy request's
output under load must equal its solo output). Then:

1. solo: a fixed set of greedy prompts (completions and chat), each sent alone; outputs recorded;
2. load: `--clients` concurrent streaming clients, each looping until the deadline: completions or chat,
   random prompt lengths, max_tokens and sampling parameters; some requests are the greedy prompts
   (their output compared with the solo one: "mismatches"); some close the connection mid-stream
   ("disconnects"). /health is polled every second (latency recorded; preemptions and KV blocks read);
   the server's VmRSS sampled;
3. drain: wait for in-flight requests (bounded), then for the KV pool to have no block in use;
4. `--hostile`: /health latency (polled every 20 ms) while one hostile request is processed alone: a chat
   request with a huge messages list, one with a single huge content, a ~8 MB completion prompt.

Writes a JSON summary; the exit code is 1 if any 5xx, mismatch, mid-stream error, or KV block left in use.
Loopback only; every phase is bounded (`--seconds` + fixed grace periods; a watchdog kills the server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
GREEDY_PROMPTS = [
    ("completion", "The quick brown fox jumps over"),
    ("completion", "def fibonacci(n):\n    if n < 2:"),
    ("completion", "In the beginning there was"),
    ("completion", "Once upon a time, in a land far away, lived a dragon named"),
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
    ("chat", "List three prime numbers and explain why each is prime."),
    ("chat", "hello"),
]
GREEDY_MAX_TOKENS = 40
WORDS = ("alpha beta gamma delta epsilon the of and to in is for on with as by at from that this these those "
         "server token model expert layer cache block stream client request kernel batch matrix vector").split()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def lat_stats(xs: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in xs]
    return {"n": len(ms), "p50_ms": _r(percentile(ms, 50)), "p99_ms": _r(percentile(ms, 99)),
            "max_ms": _r(max(ms) if ms else None), "mean_ms": _r(statistics.fmean(ms) if ms else None)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_soak_model(path: Path) -> Path:
    from gguf import GGMLQuantizationType as QT

    from moeserve.testing import ModelSpec, write_model

    spec = ModelSpec(n_layers=2, hidden_size=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8,
                     n_experts_used=2, expert_ffn=256, vocab_size=512, qtype=QT.Q6_K,
                     qtypes={"*_exps*": QT.Q4_K, "*ffn_gate_inp*": QT.F32, "token_embd.weight": QT.Q8_0,
                             "output.weight": QT.Q8_0}, seed=7)
    return write_model(path, spec)


def _die_with_parent() -> None:
    """In the server child: SIGTERM when this script dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # `timeout`'s SIGTERM: unwind through `finally` and stop the server


class Server:
    def __init__(self, model: Path, args: argparse.Namespace, workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = workdir / "server.log"
        env = dict(os.environ)
        env["MOESERVE_BATCH_INVARIANT"] = "0" if args.no_batch_invariant else "1"
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
        cmd = [sys.executable, "-m", "moeserve.server", str(model), "--host", HOST, "--port", str(self.port),
               "--kernels", "cpu", "--device", "cpu", "--num-kv-blocks", str(args.num_kv_blocks),
               "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
               "--served-model-name", "soak", "--log-level", "warning"]
        self.cmd = cmd
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent)

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if (await c.get(self.base + "/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def request_body(kind: str, prompt: str, max_tokens: int, sampling: dict[str, Any], stream: bool) -> tuple[str, dict]:
    body: dict[str, Any] = {"model": "soak", "max_tokens": max_tokens, "stream": stream, **sampling}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def chunk_text(kind: str, chunk: dict[str, Any]) -> str:
    out = []
    for ch in chunk.get("choices") or []:
        if kind == "chat":
            out.append((ch.get("delta") or {}).get("content") or "")
        else:
            out.append(ch.get("text") or "")
    return "".join(out)


class Stats:
    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.disconnects = 0
        self.status: dict[str, int] = {}
        self.http_5xx = 0
        self.http_4xx = 0
        self.stream_errors = 0
        self.transport_errors = 0
        self.tokens = 0  # completion tokens: usage of finished requests + chunks of disconnected ones
        self.prompt_tokens = 0
        self.greedy_checked = 0
        self.mismatches = 0
        self.mismatch_examples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.ttft: list[float] = []
        self.by_kind: dict[str, int] = {}


async def stream_one(client: httpx.AsyncClient, base: str, kind: str, body_path: str, body: dict,
                     stats: Stats, disconnect_after: int | None) -> tuple[str, str | None] | None:
    """One streaming request. Returns (text, finish_reason) if it ran to the end, None otherwise."""
    stats.started += 1
    t0 = time.monotonic()
    text, finish, chunks, first = [], None, 0, True
    try:
        async with client.stream("POST", base + body_path, json=body) as r:
            stats.status[str(r.status_code)] = stats.status.get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                detail = (await r.aread())[:300].decode(errors="replace")
                if r.status_code >= 500:
                    stats.http_5xx += 1
                else:
                    stats.http_4xx += 1
                if len(stats.errors) < 20:
                    stats.errors.append(f"{r.status_code} {body_path}: {detail}")
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    stats.stream_errors += 1
                    if len(stats.errors) < 20:
                        stats.errors.append(f"stream error {body_path}: {data[:300]}")
                    return None
                if chunk.get("usage"):
                    stats.tokens += chunk["usage"].get("completion_tokens", 0)
                    stats.prompt_tokens += chunk["usage"].get("prompt_tokens", 0)
                for ch in chunk.get("choices") or []:
                    finish = ch.get("finish_reason") or finish
                t = chunk_text(kind, chunk)
                if chunk.get("choices"):
                    chunks += 1
                    if first:
                        stats.ttft.append(time.monotonic() - t0)
                        first = False
                text.append(t)
                if disconnect_after is not None and chunks >= disconnect_after:
                    stats.disconnects += 1
                    stats.tokens += chunks
                    return None  # leaving the block closes the connection mid-stream
    except httpx.HTTPError as exc:
        stats.transport_errors += 1
        if len(stats.errors) < 20:
            stats.errors.append(f"transport {body_path}: {exc!r}")
        return None
    stats.completed += 1
    stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
    return "".join(text), finish


async def solo_outputs(base: str) -> list[tuple[str, str | None]]:
    stats = Stats()
    outs = []
    async with httpx.AsyncClient(timeout=60.0) as c:
        for kind, prompt in GREEDY_PROMPTS:
            path, body = request_body(kind, prompt, GREEDY_MAX_TOKENS, {"temperature": 0}, True)
            out = await stream_one(c, base, kind, path, body, stats, None)
            if out is None:
                raise RuntimeError(f"solo request failed: {stats.errors}")
            outs.append(out)
    return outs


async def client_loop(cid: int, client: httpx.AsyncClient, base: str, deadline: float, stats: Stats,
                      solo: list[tuple[str, str | None]], args: argparse.Namespace) -> None:
    rng = random.Random(args.seed * 1000 + cid)
    while time.monotonic() < deadline:
        if rng.random() < args.greedy_fraction:
            g = rng.randrange(len(GREEDY_PROMPTS))
            kind, prompt = GREEDY_PROMPTS[g]
            path, body = request_body(kind, prompt, GREEDY_MAX_TOKENS, {"temperature": 0}, True)
            disconnect = None
        else:
            g = None
            kind = "chat" if rng.random() < 0.5 else "completion"
            prompt = random_text(rng, rng.randint(1, args.max_prompt_words))
            sampling: dict[str, Any] = {"temperature": rng.choice([0, 0.3, 0.7, 1.0, 1.5])}
            if rng.random() < 0.5:
                sampling["top_p"] = rng.choice([0.5, 0.9, 1.0])
            if rng.random() < 0.3:
                sampling["top_k"] = rng.choice([1, 5, 40])
            if rng.random() < 0.5:
                sampling["seed"] = rng.randrange(2**31)
            if rng.random() < 0.2:
                sampling["presence_penalty"] = rng.choice([0.5, 1.0])
            path, body = request_body(kind, prompt, rng.randint(1, args.max_tokens), sampling, True)
            disconnect = rng.randint(1, 24) if rng.random() < args.disconnect_fraction else None
        out = await stream_one(client, base, kind, path, body, stats, disconnect)
        if g is not None and out is not None:
            stats.greedy_checked += 1
            if out != solo[g]:
                stats.mismatches += 1
                if len(stats.mismatch_examples) < 5:
                    stats.mismatch_examples.append({"prompt": GREEDY_PROMPTS[g][1], "solo": solo[g], "load": out})


async def monitor(base: str, pid: int, stop: asyncio.Event, period: float, samples: list[dict[str, Any]],
                  latencies: list[float]) -> None:
    async with httpx.AsyncClient(timeout=30.0) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = await c.get(base + "/health")
                dt = time.monotonic() - t0
                latencies.append(dt)
                h = r.json()
                samples.append({"t": round(time.time(), 1), "health_ms": round(dt * 1000, 2), "rss_kib": rss_kib(pid),
                                **{k: h.get(k) for k in ("kv_blocks_used", "requests_running", "requests_waiting",
                                                         "seqs_running", "preemptions")}})
            except httpx.HTTPError as exc:
                samples.append({"t": round(time.time(), 1), "error": repr(exc)})
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, period - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                pass


async def health(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30.0) as c:
        return (await c.get(base + "/health")).json()


async def metric_value(base: str, name: str) -> float | None:
    async with httpx.AsyncClient(timeout=30.0) as c:
        for line in (await c.get(base + "/metrics")).text.splitlines():
            if not line.startswith("#") and line.split()[0].split("{")[0].endswith(name):
                return float(line.split()[-1])
    return None


def hostile_cases() -> list[tuple[str, str, dict[str, Any]]]:
    """Bodies just under the 8 MiB limit: many messages (template loop), one huge message, one huge prompt."""
    rng = random.Random(3)
    body_budget = 8_000_000  # the limit is 8,388,608 bytes
    msg = {"role": "user", "content": "hi there"}
    n_msgs = body_budget // len(json.dumps(msg) + ", ")
    words, size = [], 0
    while size < body_budget - 1000:
        w = rng.choice(WORDS) + rng.choice(string.ascii_lowercase)
        words.append(w)
        size += len(w) + 1
    big_text = " ".join(words)
    mb = len(big_text) / 1e6
    return [
        (f"chat: {n_msgs} messages", "/v1/chat/completions",
         {"model": "soak", "max_tokens": 1, "messages": [msg] * n_msgs}),
        (f"chat: 1 message of {mb:.1f} MB", "/v1/chat/completions",
         {"model": "soak", "max_tokens": 1, "messages": [{"role": "user", "content": big_text}]}),
        (f"completion: prompt of {mb:.1f} MB", "/v1/completions",
         {"model": "soak", "max_tokens": 1, "prompt": big_text}),
    ]


async def hostile_probe(base: str, timeout: float) -> list[dict[str, Any]]:
    results = []
    async with httpx.AsyncClient(timeout=timeout) as c, httpx.AsyncClient(timeout=timeout) as hc:
        idle = []
        for _ in range(50):
            t0 = time.monotonic()
            await hc.get(base + "/health")
            idle.append(time.monotonic() - t0)
            await asyncio.sleep(0.02)
        results.append({"case": "idle (no other request)", **lat_stats(idle)})
        for name, path, body in hostile_cases():
            payload = json.dumps(body).encode()
            t0 = time.monotonic()
            task = asyncio.create_task(c.post(base + path, content=payload,
                                              headers={"content-type": "application/json"}))
            lats = []
            while not task.done():
                t1 = time.monotonic()
                try:
                    await hc.get(base + "/health")
                    lats.append(time.monotonic() - t1)
                except httpx.HTTPError:
                    break
                await asyncio.sleep(0.02)
            try:
                r = await task
                status, msg = r.status_code, r.text[:200]
            except httpx.HTTPError as exc:
                status, msg = None, repr(exc)
            results.append({"case": name, "body_bytes": len(payload), "status": status, "response": msg,
                            "request_s": round(time.monotonic() - t0, 2), **lat_stats(lats)})
    return results


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    from moeserve.kernels.cpu.build import cpu_name

    workdir = Path(tempfile.mkdtemp(prefix="moeserve-soak-"))
    model = Path(args.model) if args.model else write_soak_model(workdir / "soak-moe.gguf")
    server = Server(model, args, workdir)
    summary: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": platform.python_version(), "server_cmd": " ".join(server.cmd[1:]),
        "batch_invariant": not args.no_batch_invariant, "seconds": args.seconds, "clients": args.clients,
        "num_kv_blocks": args.num_kv_blocks, "max_num_seqs": args.max_num_seqs, "seed": args.seed,
    }
    try:
        t_start = time.monotonic()
        await server.wait_ready(args.startup_timeout)
        summary["startup_s"] = round(time.monotonic() - t_start, 2)
        solo = await solo_outputs(server.base)
        summary["rss_start_kib"] = rss_kib(server.proc.pid)
        h0 = await health(server.base)
        summary["preemptions_before"] = h0["preemptions"]

        stats, samples, lats = Stats(), [], []
        stop = asyncio.Event()
        mon = asyncio.create_task(monitor(server.base, server.proc.pid, stop, 1.0, samples, lats))
        limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
        t_load = time.monotonic()
        deadline = t_load + args.seconds
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
            tasks = [asyncio.create_task(client_loop(i, client, server.base, deadline, stats, solo, args))
                     for i in range(args.clients)]
            _, pending = await asyncio.wait(tasks, timeout=args.seconds + args.drain_timeout)
            summary["clients_cancelled_at_drain"] = len(pending)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        summary["load_wall_s"] = round(time.monotonic() - t_load, 1)
        # The pool must drain: every sequence finished or aborted (disconnects included), no block in use.
        end_health = await health(server.base)
        t_drain = time.monotonic()
        while (end_health["kv_blocks_used"] or end_health["requests_running"] or end_health["requests_waiting"]) \
                and time.monotonic() - t_drain < 20:
            await asyncio.sleep(0.5)
            end_health = await health(server.base)
        summary["kv_drain_wait_s"] = round(time.monotonic() - t_drain, 1)
        stop.set()
        await mon
        summary["rss_end_kib"] = rss_kib(server.proc.pid)
        rss = [s["rss_kib"] for s in samples if s.get("rss_kib")]
        summary["rss_peak_kib"] = max(rss) if rss else None
        # RSS after the first quarter of the load (the server has by then seen 64 concurrent clients, every
        # request kind, preemption and disconnects): growth from there to the end separates a leak from warm-up.
        warm = [s["rss_kib"] for s in samples if s.get("rss_kib") and s["t"] >= time.time() - 0.75 * (
            time.monotonic() - t_load)]
        summary["rss_warm_kib"] = warm[0] if warm else None
        summary["rss_trace_kib"] = rss[::max(1, len(rss) // 20)]
        for key, base in (("rss_growth_pct", summary["rss_start_kib"]), ("rss_growth_after_warmup_pct", warm[0]
                                                                          if warm else None)):
            if base and summary["rss_end_kib"]:
                summary[key] = round(100 * (summary["rss_end_kib"] - base) / base, 2)
        summary.update({
            "requests_started": stats.started, "requests_completed": stats.completed,
            "completed_by_kind": stats.by_kind, "disconnects": stats.disconnects,
            "completion_tokens": stats.tokens, "prompt_tokens_completed": stats.prompt_tokens,
            "tokens_per_s": round(stats.tokens / max(1e-9, args.seconds), 1),
            "http_status": stats.status, "http_5xx": stats.http_5xx, "http_4xx": stats.http_4xx,
            "stream_errors": stats.stream_errors, "transport_errors": stats.transport_errors,
            "greedy_checked": stats.greedy_checked, "mismatches_vs_solo": stats.mismatches,
            "mismatch_examples": stats.mismatch_examples, "errors": stats.errors,
            "preemptions": end_health["preemptions"] - h0["preemptions"],
            "preemptions_metric": await metric_value(server.base, "num_preemptions_total"),
            "kv_blocks_total": end_health["kv_blocks_total"], "kv_blocks_used_end": end_health["kv_blocks_used"],
            "kv_blocks_free_end": end_health["kv_blocks_free"], "kv_blocks_cached_end": end_health["kv_blocks_cached"],
            "kv_blocks_used_max": max((s.get("kv_blocks_used") or 0 for s in samples), default=None),
            "requests_running_max": max((s.get("requests_running") or 0 for s in samples), default=None),
            "requests_waiting_max": max((s.get("requests_waiting") or 0 for s in samples), default=None),
            "end_health": end_health, "health_latency": lat_stats(lats),
            "health_errors": sum(1 for s in samples if "error" in s),
            "ttft": lat_stats(stats.ttft),
        })
        if args.samples:
            summary["samples"] = samples
        if args.hostile:
            summary["hostile"] = await hostile_probe(server.base, args.hostile_timeout)
            summary["rss_after_hostile_kib"] = rss_kib(server.proc.pid)
        summary["server_alive"] = server.proc.poll() is None
    finally:
        summary["server_exit_code"] = server.stop()
        summary["server_log_tail"] = server.log_tail(2000)
        shutil.rmtree(workdir, ignore_errors=True)
    summary["ok"] = bool(summary.get("server_alive") and summary.get("http_5xx") == 0
                         and summary.get("mismatches_vs_solo") == 0 and summary.get("stream_errors") == 0
                         and summary.get("kv_blocks_used_end") == 0 and summary.get("requests_completed", 0) > 0)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 600)))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--model", default=None, help="GGUF file (default: a random 2-layer Qwen3-MoE)")
    ap.add_argument("--num-kv-blocks", type=int, default=256, help="small enough to preempt (16 tokens a block)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128, help="largest random max_tokens")
    ap.add_argument("--max-prompt-words", type=int, default=120)
    ap.add_argument("--greedy-fraction", type=float, default=0.25)
    ap.add_argument("--disconnect-fraction", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2, help="server OMP_NUM_THREADS unless already set")
    ap.add_argument("--no-batch-invariant", action="store_true", help="default kernels (mismatches expected)")
    ap.add_argument("--hostile", action="store_true", help="then measure /health during hostile requests")
    ap.add_argument("--hostile-timeout", type=float, default=120.0)
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--drain-timeout", type=float, default=120.0)
    ap.add_argument("--startup-timeout", type=float, default=120.0)
    ap.add_argument("--samples", action="store_true", help="keep the per-second /health samples in the JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    summary = asyncio.run(soak(args))
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    short = {k: v for k, v in summary.items() if k not in ("samples", "server_log_tail", "end_health")}
    print(json.dumps(short, indent=2))
    if not summary["ok"]:
        print("SOAK FAILED; server log tail:\n" + summary.get("server_log_tail", ""), file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
