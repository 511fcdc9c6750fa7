"""`LLM`: the offline entry point — load a GGUF, then `logits`, `generate`, `chat`. A thin facade.

    llm = LLM("model.gguf")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    print(out[0].outputs[0].text)

Loading picks a kernel backend (`kernels/backend.py`), wires the decoder from its kernels, and
builds one `LLMEngine` (scheduler, paged KV pool, `ModelRunner`, sampler). `generate` queues every
prompt on that engine at once: each step is one batched forward in which all running sequences
decode together and new prompts prefill in chunks. `logits` is one full forward through the same
runner with no cache, so it is safe to call from other threads while the engine serves.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeserve.chat_template import CHATML_TEMPLATE, ChatTemplate
from moeserve.engine.distributed import (
    Driver,
    ParallelConfig,
    Workers,
    WorkerSpec,
    free_port,
    held_by_rank,
    join,
    leave,
    torchrun_env,
)
from moeserve.engine.engine import EngineConfig, EngineStats, LLMEngine, Prompt
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling import SamplingParams
from moeserve.engine.tools import parse_tool_calls, prepare_messages
from moeserve.errors import GGUFError, MoeServeError, RequestError
from moeserve.gguf.config import DEFAULT_MAX_CONTEXT, load_config
from moeserve.gguf.reader import GGUFFile
from moeserve.kernels.select import batch_invariant_requested, requested, select_backend
from moeserve.model.decoder import load_decoder
from moeserve.model.parallel import Shard

__all__ = ["LLM", "Prompt", "default_model_path"]


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


def parse_device(device: str | torch.device) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against this machine: one `RequestError` naming the device, instead of
    torch's assertion from deep inside the first allocation."""
    text = str(device).strip().lower()
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise RequestError(f"device {str(device)!r}: expected cpu, cuda or cuda:N")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise RequestError(f"device {str(device)!r}: {why} (torch {torch.__version__}); use --device cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise RequestError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return torch.device(text)


MAX_CHAT_TEMPLATE_BYTES = 1 << 20  # real templates are a few KB; Qwen3's, with tools, is 4 KB


def resolve_chat_template(value: str | None) -> str | None:
    """`chat_template` as given (vLLM's `--chat-template`): None (the GGUF's own), a file holding a Jinja
    template, or the template itself; checked to compile, so a typo is one line at start-up, not a 500 on the
    first chat request."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError("chat_template must be a Jinja template or the path of a file holding one")
    if "{{" not in value and "{%" not in value:  # not a template: a file
        path = Path(value).expanduser()
        if not path.is_file():
            raise RequestError(f"chat_template {value!r}: no such file (nor a Jinja template: no '{{{{' or '{{%')")
        if path.stat().st_size > MAX_CHAT_TEMPLATE_BYTES:
            raise RequestError(f"chat_template {value!r}: {path.stat().st_size} bytes, more than "
                               f"{MAX_CHAT_TEMPLATE_BYTES} for a chat template")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RequestError(f"chat_template {str(path)!r}: cannot be read ({exc})") from None
        source = str(path)
        if "{{" not in value and "{%" not in value:  # (so a resolved template resolves to itself)
            raise RequestError(f"chat_template {source!r} holds no Jinja ('{{{{ ... }}}}' or '{{% ... %}}'): "
                               f"it could not put the messages in a prompt")
    else:
        source = "the chat_template argument"
    try:
        ChatTemplate(value, source=source, field="chat_template")
    except MoeServeError as exc:
        raise RequestError(str(exc)) from None
    return value


def gpu_weights_fit(path: str, need: int | None, device: torch.device) -> None:
    """Refuse, in one line naming the file and the GPU, weights of `need` bytes that its free memory cannot hold
    (`need` None: they already did not fit)."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    if need is None or need > free:
        size = "do not fit" if need is None else f"need {need / 2**30:.2f} GiB"
        raise RequestError(f"{path}: the weights {size} on {device}, which has {free / 2**30:.2f} GiB of its "
                           f"{total / 2**30:.0f} GiB free (a smaller quantization, tensor_parallel_size > 1, "
                           f"or device='cpu')")


class LLM:
    """A loaded model with its tokenizer and engine."""

    def __init__(self, model: str | None = None, *, max_model_len: int | None = None, kernels: str | None = None,
                 device: str | None = None, warmup: bool = True, progress: bool = False,
                 num_kv_blocks: int | None = None, kv_cache_memory: int | str | None = None,
                 kv_cache_dtype: str = "auto", max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 enable_prefix_caching: bool = True, in_memory: bool | None = None,
                 gpu_memory_utilization: float = 0.9, enforce_eager: bool = False,
                 batch_invariant: bool | None = None, tensor_parallel_size: int = 1, expert_parallel: bool = False,
                 split_attention: bool = True, parallel_timeout: float = 60.0,
                 chat_template: str | None = None, seed: int | None = None) -> None:
        """Load `model` (a GGUF path; the embedded tiny model when None).

        `kernels`: 'auto' (default, or `$MOESERVE_KERNELS`: cpu on a CPU, triton on a GPU), 'cpu', 'triton',
        'reference' ('fast' = 'auto'). `device`: 'cpu' or 'cuda[:N]' (default: a GPU when there is one).
        `gpu_memory_utilization` sizes the KV pool on a GPU (vLLM's flag); `enforce_eager` turns CUDA graphs off.
        `in_memory` (default: on for CPU unless `MOESERVE_MMAP=1` or the
        file exceeds 80 % of the available memory) reads the file into huge-page memory at load,
        sequentially, instead of page-faulting weights in from the file map at random during the first
        tokens (see `GGUFFile.read_into_memory`). The KV-pool and batching arguments configure the engine
        (see `EngineConfig`); the pool's pages are touched only as blocks are first written.
        `batch_invariant` (default: `$MOESERVE_BATCH_INVARIANT=1`, else off) loads row-invariant kernels: a request
        then gets bitwise the same logits, hence the same greedy tokens, alone or batched with any others, at the
        cost of the GEMMs' prefill speed (the cpu backend only; see README "Kernel backends").
        `tensor_parallel_size` > 1 splits the model over that many processes (this one is rank 0; the others are
        started here, or by torchrun): attention heads and every expert's FFN are cut across ranks, or whole
        experts with `expert_parallel`; `split_attention=False` keeps attention whole on every rank;
        `parallel_timeout` bounds every collective (seconds). See `engine/distributed.py`; `close()` stops them.
        `chat_template` replaces the GGUF's own: a Jinja template, or the path of a file holding one (vLLM's
        `--chat-template`). `seed` seeds torch's global generator, which requests without a seed of their own
        draw from (vLLM's `seed`): the same seed and the same requests in the same order give the same text.
        """
        self._workers: Workers | None = None
        self._driver: Driver | None = None
        self.engine_config = EngineConfig(num_kv_blocks, kv_cache_memory, kv_cache_dtype, max_num_seqs,
                                          max_num_batched_tokens, enable_prefix_caching, gpu_memory_utilization,
                                          enforce_eager, batch_invariant_requested(batch_invariant))
        self.engine_config.validate()  # before the model is loaded: a bad knob costs no load time
        self.chat_template = resolve_chat_template(chat_template)
        if seed is not None:
            if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise RequestError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
            torch.manual_seed(int(seed))
        self.parallel = ParallelConfig(tensor_parallel_size, expert_parallel, split_attention, parallel_timeout)
        self.parallel.validate()
        if tensor_parallel_size > 1 and self.engine_config.batch_invariant:
            raise RequestError("batch_invariant is not available with tensor_parallel_size > 1 (the ranks' "
                               "expert kernels change regime with the number of pairs they receive)")
        self.path = model or default_model_path()
        if device is None:  # a GPU when there is one, unless the cpu kernels were asked for
            device = "cuda" if torch.cuda.is_available() and requested(kernels) != "cpu" else "cpu"
        self.device = parse_device(device)
        self.backend = select_backend(kernels, self.device, batch_invariant=self.engine_config.batch_invariant)
        self.kernels = self.backend.name
        out_of_memory = False
        try:
            self.file = GGUFFile(self.path)
            self.config = load_config(self.file)
            if in_memory is None:  # default: only when the copy fits comfortably (else the lazy map, no OOM);
                # never for one rank of several, which reads only its slices
                in_memory = (self.device.type == "cpu" and os.environ.get("MOESERVE_MMAP", "0") != "1"
                             and self.parallel.tensor_parallel_size == 1
                             and os.path.getsize(self.path) < 0.8 * _available_memory())
            if in_memory:
                self.file.read_into_memory(progress=progress)
            self.max_model_len = max_model_len or min(self.config.context_length, DEFAULT_MAX_CONTEXT)
            if self.device.type == "cuda":  # before minutes of uploading: the weights alone must fit
                gpu_weights_fit(self.path, self.file.total_bytes() // self.parallel.tensor_parallel_size,
                                self.device)
            shard = self._start_group(kernels) if self.parallel.tensor_parallel_size > 1 else None
            self.model = load_decoder(self.file, self.backend, self.config, max_positions=self.max_model_len,
                                      shard=shard)
            # the packed weight bytes each rank holds (its slices and the replicated small tensors)
            self.rank_weight_bytes = held_by_rank(self._driver.group) if self._driver \
                else [self.model.shard.held_bytes]
        except (MoeServeError, MemoryError, KeyboardInterrupt):
            self.close()
            raise
        except torch.cuda.OutOfMemoryError:  # the estimate fitted, the upload did not (other processes, a repack)
            out_of_memory = True  # reported below, once this traceback (and the tensors it holds) is gone
        except Exception as exc:  # a check we do not have yet: still one line naming the file
            self.close()
            raise GGUFError(f"{self.path}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
        if out_of_memory:
            self.close()
            gpu_weights_fit(self.path, None, self.device)
        self.tokenizer = self._load_tokenizer()
        try:
            self.engine = self.make_engine(self.engine_config)
        except BaseException:  # a pool that does not fit, a bad knob: the other ranks must not be left waiting
            self.close()
            raise
        if warmup:
            self.warmup()

    def _load_tokenizer(self) -> Any:
        if "tokenizer.ggml.tokens" not in self.file.metadata:
            return None
        from moeserve.tokenizer import Tokenizer

        return Tokenizer.from_metadata(self.file.metadata, source=self.path)

    def make_engine(self, config: EngineConfig | None = None) -> LLMEngine:
        """A new engine (its own KV pool and scheduler) over this model, e.g. with other pool or batch limits.
        With several ranks there is one engine at a time: the workers' pools follow the newest."""
        return LLMEngine(self.model, self.tokenizer, config or self.engine_config, source=self.path,
                         chat_template=self.chat_template or self.file.metadata.get("tokenizer.chat_template"),
                         driver=self._driver)

    # -- parallel group ---------------------------------------------------------------------
    def _start_group(self, kernels: str | None) -> Shard:
        """Join (and, unless torchrun started them, start) the other ranks; this process is rank 0."""
        size = self.parallel.tensor_parallel_size
        env = torchrun_env()
        if env is not None:
            rank, world = env
            if world != size or rank != 0:
                raise MoeServeError(f"torchrun started {world} ranks (this is rank {rank}); --tensor-parallel-size "
                                    f"is {size}: they must match, and only rank 0 builds the LLM (the others run "
                                    "moeserve.engine.distributed.worker_main)")
            init = "env://"  # every rank is its own process with its own -t: nothing to share out
        else:
            # the threads this process was given (-t) are shared out among the ranks started here
            self.parallel.threads = self.parallel.threads or max(1, torch.get_num_threads() // size)
            torch.set_num_threads(self.parallel.threads)
            init = f"tcp://127.0.0.1:{free_port()}"
            spec = WorkerSpec(self.path, kernels, str(self.device), self.max_model_len, self.parallel)
            self._workers = Workers(spec, size, init)
        group = join(0, size, self.parallel, self.device, init, self._workers)
        self._driver = Driver(group)
        atexit.register(self.close)  # the workers stop, and the group is torn down before the interpreter
        return group.shard

    def close(self) -> None:
        """Stop the other ranks of a parallel group (nothing to do in one process). Idempotent."""
        if self._driver is not None:
            self._driver.stop()
        if self._workers is not None:
            self._workers.join()
            self._workers = None
        if self._driver is not None:
            self._driver = None
            leave()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warmup(self) -> None:
        """Run a tiny prefill and decode through the engine so the first real request pays no one-time costs."""
        self.generate([[0, min(1, self.config.vocab_size - 1)]],
                      SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        self.engine.reset_stats()

    # -- forward --------------------------------------------------------------------------
    def logits(self, token_ids: Seq[int]) -> np.ndarray:
        """float32 [len(token_ids), vocab]: one full forward, no cache (safe beside a running engine)."""
        ids = self.engine.check_ids(list(token_ids), "token_ids")
        return self.engine.runner.forward_full(ids).float().cpu().numpy()

    # -- generation -----------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        return self.engine.encode_prompt(prompt)

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
        groups = [engine.make_sequences(p, sp) for p, sp in zip(prompts, plist, strict=True)]
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
             tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Render the GGUF's chat template (ChatML if none) and generate.

        With `tools` (OpenAI function definitions) the template gets them (or a Hermes-style system prompt when
        it has no tools section), and each output's `<tool_call>` blocks are parsed into `tool_calls`
        (OpenAI's shape, arguments as a JSON string; `text` keeps the rest). `chat_template_kwargs` become
        template variables (e.g. Qwen3's `enable_thinking=False`)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, add_generation_prompt, tools, **(chat_template_kwargs or {})) for c in convs]
        outs = self.generate([self.tokenizer.encode(p, add_special_tokens=False) for p in prompts], sampling_params)
        if tools:
            for out in outs:
                for c in out.outputs:
                    content, calls = parse_tool_calls(c.text)
                    if calls:
                        c.text, c.tool_calls = content or "", calls
        return outs

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        template = self.engine.chat_template or CHATML_TEMPLATE
        messages, tools = prepare_messages(list(messages), tools, template)
        return self.engine.render_chat(messages, add_generation_prompt, tools, **template_kwargs)


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)


def _update_speeds(bar: Any, engine: LLMEngine, t0: float, base: EngineStats) -> None:
    """Show prefill (prompt tokens actually computed) and decode tokens/s since generate started."""
    st = engine.stats()
    dt = max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix_str(f"prefill: {(st.computed_prompt_tokens - base.computed_prompt_tokens) / dt:.1f} tok/s, "
                        f"decode: {(st.generation_tokens - base.generation_tokens) / dt:.1f} tok/s", refresh=False)
