"""The `moeserve` command line: generate, chat, inspect, serve.

    moeserve generate "Once upon a time"                  # the embedded tiny model
    moeserve generate model.gguf "Once upon a time" --stream --temp 0
    moeserve generate -m model.gguf -f prompt.txt -n 64 -c 2048 -t 8 --seed 1
    moeserve chat model.gguf                               # REPL; /clear, /exit
    moeserve inspect model.gguf
    moeserve serve model.gguf --port 8000 --api-key secret

MODEL is optional everywhere; without it the small Qwen3-MoE shipped in the package is used.
For `generate`, which also takes a prompt, one positional argument is the prompt and two are
MODEL and PROMPT; `--model/-m` names the model explicitly (then the one positional is the prompt),
`-f/--file` reads the prompt from a file (then the one positional is the model). A lone first
argument ending in `.gguf` that does not exist is an error, never a prompt.

The flags follow llama.cpp's and vLLM's names and mean the same in every command that has them:
`-m/--model`, `-n/--max-tokens` (bench: `--n-gen`), `-t/--threads` (default: the cores this process
may use), `-c/--ctx-size` = `--max-model-len`, `--temp`/`--temperature`, `-s/--seed`, `-f/--file`,
`-q/--quiet`; `moeserve --version`. `serve`'s flags also read MOESERVE_<FLAG> environment variables
(MOESERVE_HOST, MOESERVE_PORT, MOESERVE_API_KEY, MOESERVE_MAX_NUM_SEQS, ...).

Every failure — a missing file, a broken GGUF, an invalid flag value — is one line on stderr
(`moeserve: error: ...`) and a non-zero exit code (1; 2 for command-line usage errors), never a
traceback (`MOESERVE_DEBUG=1` shows the traceback of an unexpected internal error).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from moeserve import __version__
from moeserve.errors import MoeServeError

PROG = "moeserve"


class CLIError(MoeServeError):
    """A problem with the command line itself (missing prompt, conflicting arguments)."""


def _fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit."""
    line = " ".join(str(message).split())  # never more than one line
    sys.stderr.write(f"{PROG}: error: {line}\n")
    sys.stderr.flush()
    sys.exit(code)


class _OneLineErrors(TyperGroup):
    """Click group that reports usage errors and moeserve errors as one line (no usage box)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERRORS as e:
            if type(e).__name__ == "NoArgsIsHelpError" and getattr(e, "ctx", None) is not None:
                sys.stdout.write(e.ctx.get_help() + "\n")  # bare `moeserve` / `moeserve generate`: help
                sys.exit(0)
            fmt = getattr(e, "format_message", None)
            _fail(fmt() if fmt else str(e), getattr(e, "exit_code", 2))
        except typer.Abort:
            _fail("aborted", 130)
        except MoeServeError as e:
            _fail(str(e))
        except (OSError, UnicodeDecodeError) as e:
            _fail(_describe_os_error(e))
        except Exception as e:  # a bug: still one line, the traceback on request
            if os.environ.get("MOESERVE_DEBUG"):
                raise
            _fail(f"internal error: {type(e).__name__}: {e} (set MOESERVE_DEBUG=1 for the traceback)")
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


# typer >= 0.17 vendors click (its exceptions derive from typer.TyperException); older typer uses click.
try:
    import click

    _click_error: type[BaseException] | None = click.ClickException
except ImportError:  # pragma: no cover
    _click_error = None
_CLICK_ERRORS: tuple[type[BaseException], ...] = tuple(
    {e for e in (getattr(typer, "TyperException", None), _click_error) if e is not None})


def _describe_os_error(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


app = typer.Typer(
    cls=_OneLineErrors,
    name=PROG,
    help="Mixture-of-Experts LLM inference from GGUF files. Without MODEL, the embedded tiny Qwen3-MoE is used.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"{PROG} {__version__}\n")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", is_eager=True, callback=_print_version,
                                                help="Print the version and exit.")] = False) -> None:
    """Mixture-of-Experts LLM inference from GGUF files. Without MODEL, the embedded tiny Qwen3-MoE is used."""


# --------------------------------------------------------------------------------------------
# shared options
# --------------------------------------------------------------------------------------------

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="GGUF file (default: the embedded model).",
                                              show_default=False)]
_CTX_HELP = "Context length to allocate (default: the model's, at most 4096); no more than the model's."
MaxModelLen = Annotated[int | None, typer.Option("--ctx-size", "-c", "--max-model-len", help=_CTX_HELP,
                                                 show_default=False)]
Threads = Annotated[int | None, typer.Option("--threads", "-t", min=1, envvar="MOESERVE_THREADS", show_envvar=False,
                                             help="CPU threads (default: the cores this process may use; env "
                                                  "MOESERVE_THREADS).", show_default=False)]
Kernels = Annotated[str | None, typer.Option(
    help="Kernel backend: auto | cpu | triton | reference (default: auto = cpu on a CPU, triton on a GPU, "
         "or $MOESERVE_KERNELS).",
    show_default=False)]
Device = Annotated[str | None, typer.Option(help="cpu or cuda[:N] (default: cuda when a GPU is available).",
                                            show_default=False)]
GpuMemory = Annotated[float, typer.Option(help="On a GPU: the share of its memory for weights, KV pool and "
                                               "activations (the KV pool takes what is left).", min=0.01, max=1.0)]
ChatTemplateOpt = Annotated[str | None, typer.Option(
    envvar="MOESERVE_CHAT_TEMPLATE", show_default=False,
    help="Jinja chat template, or a file holding one, instead of the GGUF's (env MOESERVE_CHAT_TEMPLATE).")]
EnforceEager = Annotated[bool, typer.Option(help="Never capture CUDA graphs for decode steps.")]
BatchInvariant = Annotated[bool | None, typer.Option(
    "--batch-invariant/--no-batch-invariant",
    help="Row-invariant kernels: a request gets the same logits and greedy tokens alone or batched with others, "
         "at a cost in prefill and batched-decode speed (cpu kernels only; default: $MOESERVE_BATCH_INVARIANT, "
         "else off).",
    show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No loading progress or statistics on stderr.")]
TensorParallel = Annotated[int, typer.Option(
    "--tensor-parallel-size", min=1, envvar="MOESERVE_TENSOR_PARALLEL_SIZE", show_envvar=False,
    help="Split the model over N processes (started here; or run under torchrun with N ranks): attention heads, "
         "expert FFNs and the vocabulary are cut across them; -t threads are shared out among them.")]
ExpertParallel = Annotated[bool, typer.Option(
    "--expert-parallel", "--enable-expert-parallel",
    help="With --tensor-parallel-size: give each rank whole experts instead of a slice of every expert.")]
SplitAttention = Annotated[bool, typer.Option(
    "--split-attention/--replicate-attention",
    help="With --tensor-parallel-size: split attention heads across ranks, or compute attention whole on each.")]
ParallelTimeout = Annotated[float, typer.Option(
    help="With --tensor-parallel-size: seconds a collective waits for the other ranks before the group fails.",
    min=0.1)]

MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Maximum tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temp", "--temperature", help="Sampling temperature; 0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 or -1 disables.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set with this probability mass.")]
MinP = Annotated[float, typer.Option(help="Drop tokens less likely than min-p × the most likely one.")]
RepetitionPenalty = Annotated[float, typer.Option(help="Penalise tokens already in the prompt or output (1 = off).")]
PresencePenalty = Annotated[float, typer.Option(help="Subtract from logits of tokens already generated.")]
FrequencyPenalty = Annotated[float, typer.Option(help="Subtract × count from logits of tokens already generated.")]
Seed = Annotated[int | None, typer.Option("--seed", "-s", help="Random seed: the same seed gives the same text.",
                                          show_default=False)]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this string (repeatable); not printed.",
                                                show_default=False)]
IgnoreEos = Annotated[bool, typer.Option(help="Keep generating past end-of-sequence tokens.")]


def _sampling(max_tokens: int, temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float,
              presence_penalty: float, frequency_penalty: float, seed: int | None, stop: list[str] | None,
              ignore_eos: bool) -> Any:
    from moeserve.engine.sampling import SamplingParams

    if max_tokens < 1:
        raise CLIError(f"--max-tokens must be >= 1, got {max_tokens}")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                          frequency_penalty=frequency_penalty, seed=seed, stop=list(stop or []) or None,
                          ignore_eos=ignore_eos)


def _model_path(model: str | None) -> str:
    """The GGUF to use: `model`, or the embedded default; a missing file is a one-line error."""
    from moeserve.engine.llm import default_model_path

    if model is None:
        path = default_model_path()
        if not os.path.isfile(path):
            raise CLIError(f"the embedded model is missing ({path}); reinstall moeserve or pass a MODEL file")
        return path
    if os.path.isdir(model):
        raise CLIError(f"{model}: is a directory, expected a .gguf file")
    if not os.path.isfile(model):
        raise CLIError(f"{model}: no such file")
    return model


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity), like llama.cpp's default."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (-t/--threads); returns the number used."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def _check_ctx(path: str, ctx: int | None, read_header: bool = False) -> None:
    """-c/--ctx-size/--max-model-len: positive and no more than the model's context length.

    `read_header`: parse the GGUF's header even without -c (serve: a broken file fails before the server starts).
    """
    if ctx is None and not read_header:
        return
    if ctx is not None and ctx <= 0:
        raise CLIError(f"--ctx-size must be > 0, got {ctx}")
    from moeserve.gguf.config import load_config
    from moeserve.gguf.reader import GGUFFile

    limit = load_config(GGUFFile(path)).context_length
    if ctx is not None and ctx > limit:
        raise CLIError(f"--ctx-size {ctx} is larger than the model's context length ({limit} tokens)")


def _parallel(size: int, expert_parallel: bool, split_attention: bool, timeout: float) -> dict[str, Any]:
    """`LLM(...)` arguments of --tensor-parallel-size and friends (none for one process)."""
    if size == 1:
        if expert_parallel or not split_attention:
            raise CLIError("--expert-parallel and --replicate-attention need --tensor-parallel-size 2 or more")
        return {}
    return dict(tensor_parallel_size=size, expert_parallel=expert_parallel, split_attention=split_attention,
                parallel_timeout=timeout)


def _torchrun_worker(model: str | None, kernels: str | None, device: str | None, max_model_len: int | None,
                     parallel: dict[str, Any]) -> None:
    """Under torchrun, ranks other than 0 do not run the command: they serve rank 0's steps, then exit."""
    from moeserve.engine.distributed import ParallelConfig, WorkerSpec, torchrun_env, worker_main

    env = torchrun_env()
    if env is None or env[0] == 0:
        return
    rank, world = env
    if parallel.get("tensor_parallel_size", 1) != world:
        raise CLIError(f"torchrun started {world} ranks but --tensor-parallel-size is "
                       f"{parallel.get('tensor_parallel_size', 1)}: they must match")
    import torch

    from moeserve.gguf.config import DEFAULT_MAX_CONTEXT, load_config
    from moeserve.gguf.reader import GGUFFile

    path = _model_path(model)
    ctx = max_model_len or min(load_config(GGUFFile(path)).context_length, DEFAULT_MAX_CONTEXT)
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() and kernels != "cpu" \
            else "cpu"
    cfg = ParallelConfig(world, parallel["expert_parallel"], parallel["split_attention"],
                         parallel["parallel_timeout"], threads=torch.get_num_threads())
    worker_main(WorkerSpec(path, kernels, device, ctx, cfg), rank, world, "env://")
    sys.exit(0)


def _load(model: str | None, max_model_len: int | None, kernels: str | None, quiet: bool, **engine: Any) -> Any:
    """Load the model; on a terminal, loading shows a progress bar on stderr."""
    path = _model_path(model)
    _check_ctx(path, max_model_len)
    show = not quiet and sys.stderr.isatty()
    if show:
        size = os.path.getsize(path)
        sys.stderr.write(f"Loading {os.path.basename(path)} ({_human_bytes(size)})\n")
        sys.stderr.flush()
    from moeserve.engine.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(path, max_model_len=max_model_len, kernels=kernels, progress=show, **engine)
    if show:
        sys.stderr.write(f"Loaded in {time.perf_counter() - t0:.1f} s ({llm.kernels} kernels)\n")
    return llm


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def stream_text(llm: Any, prompt: Any, params: Any) -> Iterator[Any]:
    """Yield the text of one request as it is generated, then its final CompletionOutput-like info.

    Uses the engine's DELTA outputs: each step's text is final (a possible stop string is held
    back until it is ruled out), so printing the pieces in order gives exactly `generate`'s text.
    Yields `str` pieces, and finally a dict with the finish reason and the token count.
    """
    from moeserve.engine.engine import OutputKind

    engine = llm.engine
    rid = engine.add_request(prompt, params, kind=OutputKind.DELTA)
    n_tokens, finish = 0, None
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != rid:
                    continue
                c = out.outputs[0]
                n_tokens += len(c.token_ids)
                finish = c.finish_reason or finish
                if c.text:
                    yield c.text
    finally:
        engine.abort_request(rid)  # interrupted mid-stream: free its KV blocks (no-op when done)
    yield {"finish_reason": finish, "tokens": n_tokens}


def _stats_line(tokens: int, seconds: float, finish: str | None) -> str:
    rate = tokens / seconds if seconds > 0 else 0.0
    return f"[{tokens} tokens in {seconds:.2f} s, {rate:.1f} tokens/s, finish: {finish}]\n"


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


@app.command(no_args_is_help=True)
def generate(
    args: Annotated[list[str] | None, typer.Argument(metavar="[MODEL] PROMPT", show_default=False,
                                                     help="Optional GGUF file, then the prompt ('-' reads stdin).")]
    = None,
    model: ModelOpt = None,
    file: Annotated[str | None, typer.Option("--file", "-f", show_default=False,
                                             help="Read the prompt from this file ('-' = stdin).")] = None,
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.8,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repetition_penalty: RepetitionPenalty = 1.1,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they are generated.")] = False,
    max_model_len: MaxModelLen = None,
    threads: Threads = None,
    kernels: Kernels = None,
    device: Device = None,
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    batch_invariant: BatchInvariant = None,
    tensor_parallel_size: TensorParallel = 1,
    expert_parallel: ExpertParallel = False,
    split_attention: SplitAttention = True,
    parallel_timeout: ParallelTimeout = 60.0,
    quiet: Quiet = False,
) -> None:
    """Complete PROMPT with a model. One positional argument is the prompt; two are MODEL PROMPT.

    With -f/--file the prompt comes from the file and the one positional argument, if any, is MODEL.
    Statistics (tokens, seconds, tokens/s) go to stderr unless -q.
    """
    args = list(args or [])
    usage = f"usage: {PROG} generate [MODEL] PROMPT, or {PROG} generate [MODEL] -f FILE"
    if file is not None:
        if len(args) > 1:
            raise CLIError(f"with --file the only positional argument is MODEL, got {len(args)} ({usage})")
        if args:
            if model is not None:
                raise CLIError("MODEL given twice (as --model and as an argument)")
            model = args[0]
        if file == "-":
            prompt = sys.stdin.read()
        else:
            if not os.path.isfile(file):
                raise CLIError(f"{file}: no such file" if not os.path.isdir(file) else f"{file}: is a directory")
            with open(file, encoding="utf-8") as fh:
                prompt = fh.read()
    elif len(args) > 2:
        raise CLIError(f"expected [MODEL] PROMPT, got {len(args)} arguments (quote the prompt)")
    elif len(args) == 2:
        if model is not None:
            raise CLIError("MODEL given twice (as --model and as an argument)")
        model, prompt = args
    elif not args:
        raise CLIError(f"no prompt given ({usage})")
    else:
        (prompt,) = args
        if model is None and prompt.endswith(".gguf"):
            if not os.path.exists(prompt):
                raise CLIError(f"{prompt}: no such file")
            if os.path.isfile(prompt):
                raise CLIError(f"no prompt given ({usage})")
    if prompt == "-" and file is None:
        prompt = sys.stdin.read()
    if not prompt:
        raise CLIError("the prompt is empty")
    params = _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                       frequency_penalty, seed, stop, ignore_eos)
    _set_threads(threads)
    parallel = _parallel(tensor_parallel_size, expert_parallel, split_attention, parallel_timeout)
    _torchrun_worker(model, kernels, device, max_model_len, parallel)
    llm = _load(model, max_model_len, kernels, quiet, device=device, gpu_memory_utilization=gpu_memory_utilization,
                enforce_eager=enforce_eager, batch_invariant=batch_invariant, **parallel)
    show_stats = not quiet  # on stderr also when it is a file or a pipe, like llama.cpp's timings
    t0 = time.perf_counter()
    if stream:
        info: dict = {}
        for piece in stream_text(llm, prompt, params):
            if isinstance(piece, dict):
                info = piece
            else:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        tokens, finish = info.get("tokens", 0), info.get("finish_reason")
    else:
        out = llm.generate(prompt, params)[0].outputs[0]
        sys.stdout.write(out.text + "\n")
        tokens, finish = len(out.token_ids), out.finish_reason
    sys.stdout.flush()
    if show_stats:
        sys.stderr.write(_stats_line(tokens, time.perf_counter() - t0, finish))


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------

CHAT_HELP = "Commands: /clear forgets the conversation, /exit (or Ctrl-D) quits, /help shows this."


def _fit_history(llm: Any, history: list[dict[str, str]], max_tokens: int) -> tuple[list[int], int]:
    """Token ids of the rendered conversation, dropping the oldest turns until the reply fits.

    Returns (ids, number of messages dropped). The system message and the last user message are
    never dropped; if they alone do not fit, RequestError explains why.
    """
    from moeserve.errors import RequestError

    dropped = 0
    while True:
        ids = llm.tokenizer.encode(llm.render_chat(history), add_special_tokens=False)
        if len(ids) + min(max_tokens, 16) <= llm.max_model_len or len(history) <= 1:
            break
        first = 1 if history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            break
        del history[first]
        dropped += 1
    if len(ids) >= llm.max_model_len:
        raise RequestError(f"the message is {len(ids)} tokens long with the chat template; the model's context "
                           f"is {llm.max_model_len} tokens")
    return ids, dropped


@app.command()
def chat(
    model_arg: Annotated[str | None, typer.Argument(metavar="[MODEL]", show_default=False,
                                                    help="GGUF file (default: the embedded model).")] = None,
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.", show_default=False)] = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = 0.7,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repetition_penalty: RepetitionPenalty = 1.1,
    presence_penalty: PresencePenalty = 0.0,
    frequency_penalty: FrequencyPenalty = 0.0,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: IgnoreEos = False,
    max_model_len: MaxModelLen = None,
    threads: Threads = None,
    kernels: Kernels = None,
    device: Device = None,
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    batch_invariant: BatchInvariant = None,
    tensor_parallel_size: TensorParallel = 1,
    expert_parallel: ExpertParallel = False,
    split_attention: SplitAttention = True,
    parallel_timeout: ParallelTimeout = 60.0,
    chat_template: ChatTemplateOpt = None,
    quiet: Quiet = False,
) -> None:
    """Chat with a model: an interactive REPL (reads lines from stdin, so it can be scripted).

    Each line is a user message; the reply is streamed. /clear forgets the conversation, /exit
    or end of input quits. The oldest turns are dropped when the conversation outgrows the context.
    """
    from moeserve.errors import RequestError

    if model_arg is not None and model is not None:
        raise CLIError("MODEL given twice (as --model and as an argument)")
    params = _sampling(max_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
                       frequency_penalty, seed, stop, ignore_eos)
    _set_threads(threads)
    parallel = _parallel(tensor_parallel_size, expert_parallel, split_attention, parallel_timeout)
    _torchrun_worker(model_arg or model, kernels, device, max_model_len, parallel)
    llm = _load(model_arg or model, max_model_len, kernels, quiet, device=device,
                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                batch_invariant=batch_invariant, chat_template=chat_template, **parallel)
    if llm.tokenizer is None:
        raise CLIError(f"{llm.path} has no tokenizer; chat needs one")
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    if interactive and not quiet:
        sys.stderr.write(f"Chatting with {os.path.basename(llm.path)}. {CHAT_HELP}\n")

    def notice(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                sys.stdout.write("\n")
            break
        if not interactive and line == "":  # end of input
            break
        message = line.rstrip("\r\n")
        command = message.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            break
        if command == "/clear":
            history = list(base)
            notice("(conversation cleared)")
            continue
        if command in ("/help", "/?"):
            notice(CHAT_HELP)
            continue
        if command.startswith("/") and " " not in command:
            notice(f"unknown command {command}; {CHAT_HELP}")
            continue
        history.append({"role": "user", "content": message})
        try:
            ids, dropped = _fit_history(llm, history, max_tokens)
        except RequestError as e:
            history.pop()
            notice(f"{PROG}: error: {e}")
            continue
        if dropped:
            notice(f"(dropped the {dropped} oldest message{'s' if dropped > 1 else ''} to fit the context)")
        room = llm.max_model_len - len(ids)
        turn = params if params.max_tokens <= room else _with_max_tokens(params, room)
        reply: list[str] = []
        try:
            for piece in stream_text(llm, ids, turn):
                if isinstance(piece, str):
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            notice("(interrupted)")
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply).strip()})


def _with_max_tokens(params: Any, max_tokens: int) -> Any:
    from dataclasses import replace

    return replace(params, max_tokens=max(1, max_tokens))


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def describe(path: str) -> dict[str, Any]:
    """What `inspect` shows, as plain data (also printed by `inspect --json`)."""
    from gguf import GGMLQuantizationType

    from moeserve.gguf.config import DEFAULT_MAX_CONTEXT, load_config
    from moeserve.gguf.reader import GGUFFile

    f = GGUFFile(path)
    c = load_config(f)
    meta = f.metadata
    types: dict[str, dict[str, int]] = {}
    expert_params = 0
    for name, t in f.tensors.items():
        qt = GGMLQuantizationType(int(t.tensor_type)).name
        row = types.setdefault(qt, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
        if "_exps." in name:
            expert_params += int(t.n_elements)
    n_params = f.n_params()
    active = n_params - expert_params + (expert_params * c.n_experts_used // c.n_experts if c.n_experts else 0)
    ctx = min(c.context_length, DEFAULT_MAX_CONTEXT)
    kv_per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4  # K and V, float32
    weights = f.total_bytes()
    tok = None
    if "tokenizer.ggml.tokens" in meta:
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        tok = {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
               "tokens": len(tokens), "bos": token("bos_token_id"), "eos": token("eos_token_id"),
               "chat_template": "tokenizer.chat_template" in meta}
    return {
        "path": path,
        "file_bytes": os.path.getsize(path),
        "name": meta.get("general.name"),
        "license": meta.get("general.license"),
        "architecture": c.arch,
        "config": {
            "layers": c.n_layers, "hidden_size": c.hidden_size, "attention_heads": c.n_heads,
            "kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "context_length": c.context_length, "rope_theta": c.rope_theta, "rms_eps": c.rms_eps,
            **({"experts": c.n_experts, "experts_per_token": c.n_experts_used,
                "expert_ffn": c.expert_intermediate_size} if c.is_moe else {"ffn": c.intermediate_size}),
            "tied_embeddings": c.tied_embeddings, "sliding_window": c.sliding_window,
        },
        "tensor_types": types,
        "parameters": n_params,
        "active_parameters": active,
        "tokenizer": tok,
        "memory": {"weights_bytes": weights, "kv_bytes_per_token": kv_per_token, "context": ctx,
                   "kv_bytes_one_sequence": kv_per_token * ctx, "total_one_sequence": weights + kv_per_token * ctx},
    }


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@app.command()
def inspect(
    model_arg: Annotated[str | None, typer.Argument(metavar="[MODEL]", show_default=False,
                                                    help="GGUF file (default: the embedded model).")] = None,
    model: ModelOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Show a GGUF's architecture, config, tensor types, parameter count and memory estimate."""
    if model_arg is not None and model is not None:
        raise CLIError("MODEL given twice (as --model and as an argument)")
    d = describe(_model_path(model_arg or model))
    if as_json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    con = Console(highlight=False, soft_wrap=True)
    con.print(f"[bold]{d['path']}[/bold]  ({_human_bytes(d['file_bytes'])})")
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="dim")
    head.add_column()
    head.add_row("architecture", d["architecture"])
    if d["name"]:
        head.add_row("name", str(d["name"]))
    if d["license"]:
        head.add_row("license", str(d["license"]))
    for key, value in d["config"].items():
        if value is not None:
            head.add_row(key.replace("_", " "), f"{value:g}" if isinstance(value, float) else str(value))
    if d["tokenizer"]:
        t = d["tokenizer"]
        head.add_row("tokenizer", f"{t['model']} (pre={t['pre']}), {t['tokens']} tokens, bos={t['bos']!r}, "
                                  f"eos={t['eos']!r}, chat template: {'yes' if t['chat_template'] else 'no (ChatML)'}")
    con.print(head)

    table = Table(title="Tensor types", title_justify="left")
    table.add_column("type")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("size", justify="right")
    table.add_column("share", justify="right")
    total_bytes = sum(r["bytes"] for r in d["tensor_types"].values()) or 1
    for qt, r in sorted(d["tensor_types"].items(), key=lambda kv: -kv[1]["bytes"]):
        table.add_row(qt, str(r["tensors"]), _count(r["params"]), _human_bytes(r["bytes"]),
                      f"{100 * r['bytes'] / total_bytes:.1f}%")
    con.print(table)
    m = d["memory"]
    active = f", {_count(d['active_parameters'])} active per token" if d["active_parameters"] != d["parameters"] else ""
    con.print(f"parameters: {_count(d['parameters'])} ({d['parameters']:,}){active}")
    con.print(f"memory: weights {_human_bytes(m['weights_bytes'])} (kept packed) + KV cache "
              f"{_human_bytes(m['kv_bytes_per_token'])}/token (float32) = "
              f"{_human_bytes(m['total_one_sequence'])} for one {m['context']}-token sequence")


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------


@app.command()
def serve(
    model_arg: Annotated[str | None, typer.Argument(metavar="[MODEL]", show_default=False,
                                                    help="GGUF file (default: the embedded model).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", envvar="MOESERVE_MODEL", show_default=False,
                                              help="GGUF file (default: the embedded model; env MOESERVE_MODEL).")]
    = None,
    host: Annotated[str, typer.Option(envvar="MOESERVE_HOST", help="Address to listen on (env MOESERVE_HOST).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="MOESERVE_PORT", help="Port to listen on (env MOESERVE_PORT).", min=1,
                                      max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="MOESERVE_API_KEY", show_default=False,
                                                help="Require 'Authorization: Bearer KEY' (env MOESERVE_API_KEY).")]
    = None,
    served_model_name: Annotated[str | None, typer.Option(
        envvar="MOESERVE_SERVED_MODEL_NAME", show_default=False,
        help="Model id in the API (default: file name; env MOESERVE_SERVED_MODEL_NAME).")] = None,
    max_model_len: Annotated[int | None, typer.Option("--ctx-size", "-c", "--max-model-len", show_default=False,
                                                      envvar="MOESERVE_MAX_MODEL_LEN",
                                                      help=_CTX_HELP + " (env MOESERVE_MAX_MODEL_LEN)")] = None,
    threads: Threads = None,
    kernels: Kernels = None,
    device: Device = None,
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    batch_invariant: BatchInvariant = None,
    tensor_parallel_size: TensorParallel = 1,
    expert_parallel: ExpertParallel = False,
    split_attention: SplitAttention = True,
    parallel_timeout: ParallelTimeout = 60.0,
    max_num_seqs: Annotated[int | None, typer.Option(envvar="MOESERVE_MAX_NUM_SEQS", min=1, show_default=False,
                                                     help="Sequences decoded together (default 32; env "
                                                          "MOESERVE_MAX_NUM_SEQS).")] = None,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        envvar="MOESERVE_MAX_NUM_BATCHED_TOKENS", min=1, show_default=False,
        help="Tokens per engine step, decode rows plus prefill chunks (default 512; env "
             "MOESERVE_MAX_NUM_BATCHED_TOKENS).")] = None,
    kv_cache_memory: Annotated[str | None, typer.Option(envvar="MOESERVE_KV_CACHE_MEMORY", show_default=False,
                                                        help="KV pool budget, e.g. 2GiB (env "
                                                             "MOESERVE_KV_CACHE_MEMORY).")] = None,
    kv_cache_dtype: Annotated[str | None, typer.Option(
        envvar="MOESERVE_KV_CACHE_DTYPE", show_default=False,
        help="KV pool dtype: auto (float32 on a CPU, float16 on a GPU), float32, float16 or bfloat16 (env "
             "MOESERVE_KV_CACHE_DTYPE).")] = None,
    enable_prefix_caching: Annotated[bool, typer.Option(
        envvar="MOESERVE_ENABLE_PREFIX_CACHING",
        help="Reuse the KV blocks of prompt prefixes seen before (env MOESERVE_ENABLE_PREFIX_CACHING).")] = True,
    chat_template: ChatTemplateOpt = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", "-s", envvar="MOESERVE_SEED", min=0, show_default=False,
        help="Seed of the generator that requests without a seed draw from (env MOESERVE_SEED).")] = None,
    allowed_origins: Annotated[list[str] | None, typer.Option(
        "--allowed-origins", envvar="MOESERVE_ALLOWED_ORIGINS", show_default=False,
        help="Enable CORS for these origins (repeatable or comma-separated; '*' for any; env "
             "MOESERVE_ALLOWED_ORIGINS).")] = None,
    log_level: Annotated[str, typer.Option(envvar="MOESERVE_LOG_LEVEL", help="Log level (env MOESERVE_LOG_LEVEL).")]
    = "info",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No startup banner on stderr.")] = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API.

    The server answers at once; /health says 503 {"status": "loading"} until the model is loaded, then 200.
    A banner on stderr then names the model, its weight types, the context, the KV pool, the kernels and the URL.
    """
    if model_arg is not None and model is not None:
        raise CLIError("MODEL given twice (as --model and as an argument)")
    path = _model_path(model_arg or model)
    _check_ctx(path, max_model_len, read_header=True)
    levels = ("critical", "error", "warning", "info", "debug", "trace")
    if log_level.lower() not in levels:
        raise CLIError(f"--log-level {log_level!r}: expected one of {', '.join(levels)}")
    log_level = log_level.lower()
    if kv_cache_memory is not None:
        from moeserve.engine.paged_cache import parse_memory

        try:
            parse_memory(kv_cache_memory)
        except ValueError as exc:
            raise CLIError(f"--kv-cache-memory: {exc}") from None
    origins = [o.strip() for item in allowed_origins or [] for o in item.split(",") if o.strip()] or None
    _set_threads(threads)
    from moeserve.server.app import run  # imported lazily: fastapi/uvicorn are only needed here

    engine_kwargs = {k: v for k, v in dict(max_model_len=max_model_len, kernels=kernels, max_num_seqs=max_num_seqs,
                                           max_num_batched_tokens=max_num_batched_tokens,
                                           kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                                           enable_prefix_caching=None if enable_prefix_caching else False,
                                           device=device,
                                           gpu_memory_utilization=gpu_memory_utilization,
                                           enforce_eager=enforce_eager, chat_template=chat_template, seed=seed,
                                           batch_invariant=batch_invariant).items() if v is not None}
    from dataclasses import fields

    from moeserve.engine.engine import EngineConfig

    knobs = {f.name for f in fields(EngineConfig)}  # checked now, not after the server has started loading
    EngineConfig(**{k: v for k, v in engine_kwargs.items() if k in knobs}).validate()
    if chat_template is not None:
        from moeserve.engine.llm import resolve_chat_template

        engine_kwargs["chat_template"] = resolve_chat_template(chat_template)  # a file is read once, here
    extra: dict[str, Any] = {}
    if origins:
        extra["allowed_origins"] = origins
    if quiet:
        extra["quiet"] = True
    parallel = _parallel(tensor_parallel_size, expert_parallel, split_attention, parallel_timeout)
    _torchrun_worker(path, kernels, device, max_model_len, parallel)
    run(path, host=host, port=port, api_key=api_key, served_model_name=served_model_name, log_level=log_level,
        **extra, **engine_kwargs, **parallel)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


@app.command()
def bench(
    model_arg: Annotated[str | None, typer.Argument(metavar="[MODEL]", show_default=False,
                                                    help="GGUF file (default: the embedded model).")] = None,
    model: ModelOpt = None,
    n_prompt: Annotated[int, typer.Option("-p", "--n-prompt", min=0, help="Prompt tokens (pp test).")] = 512,
    n_gen: Annotated[int, typer.Option("-n", "--n-gen", min=0, help="Generated tokens (tg test).")] = 128,
    threads: Threads = None,
    reps: Annotated[int, typer.Option("-r", "--repetitions", min=1, help="Repetitions of each test.")] = 3,
    kernels: Kernels = None,
    device: Device = None,
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    batch_invariant: BatchInvariant = None,
    tensor_parallel_size: TensorParallel = 1,
    expert_parallel: ExpertParallel = False,
    split_attention: SplitAttention = True,
    parallel_timeout: ParallelTimeout = 60.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (pp_tps, tg_tps, ...).")] = False,
    profile: Annotated[bool, typer.Option("--profile", help="Per-stage prefill and decode breakdown.")] = False,
) -> None:
    """Prompt-processing and generation speed, llama-bench style (mean ± sd over repetitions)."""
    if model_arg is not None and model is not None:
        raise CLIError("MODEL given twice (as --model and as an argument)")
    if n_prompt == 0 and n_gen == 0:
        raise CLIError("nothing to measure: -p and -n are both 0")
    from moeserve.bench import format_table, run_bench

    threads = threads or default_threads()
    parallel = _parallel(tensor_parallel_size, expert_parallel, split_attention, parallel_timeout)
    _set_threads(threads)
    _torchrun_worker(model_arg or model, kernels, device, max(n_prompt, n_gen) + 8, parallel)
    result = run_bench(_model_path(model_arg or model), n_prompt=n_prompt, n_gen=n_gen, threads=threads, reps=reps,
                       kernels=kernels, profile=profile, progress=not json_out and sys.stderr.isatty(), device=device,
                       gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                       batch_invariant=batch_invariant, **parallel)
    if json_out:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    else:
        sys.stdout.write(format_table(result) + "\n")


def main() -> None:  # `python -m moeserve.cli`
    app()


if __name__ == "__main__":
    main()
