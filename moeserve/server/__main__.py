"""`python -m moeserve.server MODEL [--port N] ...`: the server without the full CLI.

`moeserve serve` (the CLI) is the user-facing entry point; this module exists so tests and
scripts can start a server process with nothing but the package importable.
"""

from __future__ import annotations

import argparse

from moeserve.server.app import run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moeserve.server", description=__doc__)
    ap.add_argument("model", nargs="?", default=None, help="GGUF file (default: the embedded tiny model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--kernels", default=None, choices=["auto", "cpu", "triton", "reference", "fast"])
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--kv-cache-memory", default=None, help="pool budget, e.g. 2GiB")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--batch-invariant", action="store_true", default=None,
                    help="row-invariant kernels: a request's tokens never depend on its batch")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--allowed-origins", action="append", default=None,
                    help="enable CORS for this origin (repeatable, or comma-separated; '*' for any)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: the usable cores)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no startup banner")
    a = ap.parse_args(argv)
    if a.threads is not None:
        import torch

        torch.set_num_threads(max(1, a.threads))
    origins = [o.strip() for item in a.allowed_origins or [] for o in item.split(",") if o.strip()] or None
    run(a.model, host=a.host, port=a.port, api_key=a.api_key, served_model_name=a.served_model_name,
        log_level=a.log_level, allowed_origins=origins, quiet=a.quiet, max_model_len=a.max_model_len,
        kernels=a.kernels, num_kv_blocks=a.num_kv_blocks,
        kv_cache_memory=a.kv_cache_memory, kv_cache_dtype=a.kv_cache_dtype, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=not a.no_prefix_caching,
        device=a.device, gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=a.enforce_eager,
        batch_invariant=a.batch_invariant)


if __name__ == "__main__":
    main()
