"""`LLM`: the offline entry point — load a GGUF, then `logits`, `generate`, `chat`.

    llm = LLM("model.gguf")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    print(out[0].outputs[0].text)

`generate` runs on the continuous-batching engine (`engine.py`): every prompt is queued at once,
and each step is one batched forward in which all running sequences decode together and new
prompts prefill in chunks, over a paged KV pool with prefix caching. `_forward` is the simple
contiguous-cache path (one cache per sequence id), kept for tests and tools that drive the model
step by step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from moeserve.engine.engine import EngineConfig, EngineStats, LLMEngine
from moeserve.engine.kv_cache import KVCache
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling import Sampler, SamplingParams
from moeserve.engine.sequence import Sequence
from moeserve.errors import RequestError
from moeserve.gguf.config import DEFAULT_MAX_CONTEXT, load_config
from moeserve.gguf.reader import GGUFFile
from moeserve.model.decoder import load_decoder
from moeserve.model.layers import SeqSlice

Prompt = str | Seq[int]


def default_model_path() -> str:
    """The small Qwen3-MoE shipped inside the package (used when no model is given)."""
    from importlib.resources import files

    return str(files("moeserve") / "data" / "moeserve-tiny-moe.gguf")


def _available_memory() -> int:
    """Bytes of memory available for new allocations (MemAvailable; unbounded if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


class LLM:
    """A loaded model with its tokenizer, KV cache and sampler."""

    def __init__(self, model: str | None = None, *, max_model_len: int | None = None, kernels: str | None = None,
                 device: str | None = None, warmup: bool = True, progress: bool = False,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | str | None = None,
                 kv_cache_dtype: str = "float32", max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, in_memory: bool | None = None) -> None:
        """Load `model` (a GGUF path; the embedded tiny model when None).

        `in_memory` (default: on for CPU unless `MOESERVE_MMAP=1` or the file exceeds 80 % of the
        available memory) reads the file into huge-page memory at load, sequentially, instead of
        page-faulting weights in from the file map at random during the first tokens (see
        `GGUFFile.read_into_memory`).

        The KV-pool and batching arguments configure the engine behind `generate` and the server
        (see `EngineConfig`); the pool itself is allocated on first use.
        """
        self.engine_config = EngineConfig(num_kv_blocks, kv_cache_memory, kv_cache_dtype, max_num_seqs,
                                          max_num_batched_tokens, enable_prefix_caching)
        self._engine: LLMEngine | None = None
        self.path = model or default_model_path()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.file = GGUFFile(self.path)
        self.config = load_config(self.file)
        if in_memory is None:  # default: only when the copy fits comfortably (else the lazy map, no OOM)
            in_memory = (self.device.type == "cpu" and os.environ.get("MOESERVE_MMAP", "0") != "1"
                         and os.path.getsize(self.path) < 0.8 * _available_memory())
        if in_memory:
            self.file.read_into_memory(progress=progress)
        cap = max_model_len or min(self.config.context_length, DEFAULT_MAX_CONTEXT)
        self.max_model_len = cap
        self.model = load_decoder(self.file, self.config, self.device, max_positions=cap)
        self.kernels = kernels or os.environ.get("MOESERVE_KERNELS", "fast")
        self._prepare_kernels(progress)
        self.tokenizer = self._load_tokenizer()
        self.kv = KVCache(self.config, cap, device=self.device)
        self.sampler = Sampler()
        self._next_id = 0
        if warmup:
            self.warmup()

    # -- loading --------------------------------------------------------------------------
    def _prepare_kernels(self, progress: bool) -> None:
        if self.kernels == "reference":
            return
        if self.kernels != "fast":
            raise RequestError(f"kernels must be 'fast' or 'reference', got {self.kernels!r}")
        try:
            from moeserve.kernels.fast import prepare_model
        except ImportError:  # fast kernels not built for this platform: stay on the reference path
            self.kernels = "reference"
            return
        prepare_model(self.model, progress=progress)

    def _load_tokenizer(self) -> Any:
        if "tokenizer.ggml.tokens" not in self.file.metadata:
            return None
        from moeserve.tokenizer import Tokenizer

        return Tokenizer.from_metadata(self.file.metadata, source=self.path)

    def warmup(self) -> None:
        """Run a tiny prefill and decode so the first real request pays no one-time costs."""
        seq_id = ("warmup",)
        try:
            ids = [0, min(1, self.config.vocab_size - 1)]
            self._forward([(seq_id, ids)])
            self._forward([(seq_id, ids[:1])])
        finally:
            self.kv.release(seq_id)

    # -- forward --------------------------------------------------------------------------
    def _forward(self, batch: list[tuple[object, list[int]]]) -> torch.Tensor:
        """Append `tokens` to each sequence's cache; logits [len(batch), V] of each last token.

        Every sequence's capacity is checked before any layer writes (no partial writes).
        """
        kvs = [self.kv.reserve(seq_id, len(tokens)) for seq_id, tokens in batch]
        ids, positions, slices, last = [], [], [], []
        for kv, (_, tokens) in zip(kvs, batch):
            slices.append(SeqSlice(start=len(ids), length=len(tokens), pos=kv.length, kv=kv))
            positions.extend(range(kv.length, kv.length + len(tokens)))
            ids.extend(tokens)
            last.append(len(ids) - 1)
        dev = self.device
        logits = self.model.forward(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), slices,
                                    torch.tensor(last, device=dev))
        for kv, (_, tokens) in zip(kvs, batch):
            kv.length += len(tokens)
        return logits

    def logits(self, token_ids: Seq[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: one full forward, no cache."""
        ids = self._check_ids(list(token_ids), "token_ids")
        n = len(ids)
        t = torch.tensor(ids, device=self.device)
        out = self.model.forward(t, torch.arange(n, device=self.device), [SeqSlice(0, n)])
        return out.float().cpu().numpy()

    def _check_ids(self, ids: list[int], what: str) -> list[int]:
        if not ids:
            raise RequestError(f"{what} is empty")
        bad = [i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= i < self.config.vocab_size]
        if bad:
            raise RequestError(f"{what} contains ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        if len(ids) > self.max_model_len:
            raise RequestError(
                f"{what} has {len(ids)} tokens, more than the maximum context length of {self.max_model_len}")
        return [int(i) for i in ids]

    # -- generation -----------------------------------------------------------------------
    @property
    def engine(self) -> LLMEngine:
        """The continuous-batching engine (paged KV pool, scheduler), created on first use."""
        if self._engine is None:
            self._engine = LLMEngine(self, self.engine_config)
        return self._engine

    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(f"{self.path} has no tokenizer; pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def make_sequences(self, prompt: Prompt, params: SamplingParams) -> list[Sequence]:
        text, ids = self.encode_prompt(prompt)
        ids = self._check_ids(ids, "prompt")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the maximum context length is {self.max_model_len} "
                               "and at least one token must be generated")
        rid = str(self._next_id)
        self._next_id += 1
        eos = frozenset(self.tokenizer.eos_token_ids) if self.tokenizer is not None else frozenset()
        seqs = []
        for i in range(params.n):
            s = Sequence(request_id=rid, prompt_ids=ids, params=params, prompt=text, index=i, eos_ids=eos)
            if self.tokenizer is not None:
                from moeserve.tokenizer import StreamDecoder

                s.detok = StreamDecoder(self.tokenizer)
            seqs.append(s)
        return seqs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        out = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                  [s.all_ids for s in seqs], [s.output_ids for s in seqs])
        for s, tok, lp in zip(seqs, out.token_ids.tolist(), out.logprobs):
            s.append(int(tok), lp, self.max_model_len)

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt; one RequestOutput per prompt, in order.

        All prompts go to the engine at once, so they prefill and decode batched together.
        Every prompt is validated before any is queued, so a bad one leaves the engine untouched.
        """
        if isinstance(prompts, str) or (isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise RequestError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        groups = [engine.make_sequences(p, sp) for p, sp in zip(prompts, plist)]
        rids = [engine.add_sequences(g) for g in groups]
        results: dict[str, RequestOutput] = {}
        t0 = time.perf_counter()
        bar = _progress_bar(len(rids)) if use_tqdm else None
        base = engine.stats()
        try:
            while len(results) < len(rids) and engine.has_unfinished():
                for out in engine.step():
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
                if bar is not None:
                    _update_speeds(bar, engine, t0, base)
        finally:
            for rid in rids:
                if rid not in results:
                    engine.abort_request(rid)
            if bar is not None:
                bar.close()
        self.last_generate_seconds = time.perf_counter() - t0
        return [results[r] for r in rids]

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, add_generation_prompt: bool = True,
             tools: list[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Render the GGUF's chat template (ChatML if none) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, add_generation_prompt, tools) for c in convs]
        return self.generate([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts], sampling_params)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        from moeserve.chat_template import ChatTemplate

        if self.tokenizer is None:
            raise RequestError(f"{self.path} has no tokenizer; chat needs one")
        tpl = ChatTemplate(self.file.metadata.get("tokenizer.chat_template"), self.tokenizer.bos_token,
                           self.tokenizer.eos_token)
        return tpl.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def _update_speeds(bar: Any, engine: LLMEngine, t0: float, base: EngineStats) -> None:
    """Show prefill (prompt tokens actually computed) and decode tokens/s since generate started."""
    st = engine.stats()
    dt = max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix_str(f"prefill: {(st.computed_prompt_tokens - base.computed_prompt_tokens) / dt:.1f} tok/s, "
                        f"decode: {(st.generation_tokens - base.generation_tokens) / dt:.1f} tok/s", refresh=False)
