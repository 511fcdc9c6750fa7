"""Turning next-token logits into token ids: request parameters, the sampler and stop strings.

The parameter names, defaults and the order of the logit transforms follow vLLM (and so the
OpenAI API), because clients written against those servers expect the same request to mean the
same thing here:

    logit bias -> grammar mask (structured output) -> repetition penalty -> frequency/presence
    penalties -> temperature -> top-k -> top-p -> min-p -> sample (argmax when greedy)

Logprobs are reported from the *raw* logits (before any bias, grammar mask, penalty, temperature
or filter), which is vLLM's default: they describe what the model believed, not the sampling
distribution that a request's knobs happened to produce.

Every transform is a pure function (it returns a new tensor and never modifies its input), so
the filters can be tested on hand-written logits and a caller may keep the raw logits around.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from moeserve.engine.guided import Guide, StructuredOutputsParams, apply_bitmask, fill_bitmask
from moeserve.errors import RequestError

#: OpenAI's range for logit_bias values; larger ones are clamped to it.
MAX_LOGIT_BIAS = 100.0

# Temperatures below this are treated as greedy, like vLLM: dividing by a tiny temperature only
# produces inf/NaN where argmax gives the intended answer.
_SAMPLING_EPS = 1e-5


def _bad(name: str, value: object, expected: str) -> RequestError:
    """Build the one-line error every validation failure uses: parameter, value, expectation."""
    return RequestError(f"invalid sampling parameter {name}={value!r}: {expected}")


def _is_int(value: object) -> bool:
    """True for real integers; bool is excluded because `top_k=True` is a client bug, not 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """True for int/float (not bool), so JSON numbers of either kind are accepted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Per-request sampling parameters, shaped like vLLM's so OpenAI-style requests map 1:1.

    Validation happens here, once, when the request arrives, so the sampler's hot loop can
    trust the values and a bad request fails with a message naming the offending parameter
    instead of a NaN or an index error deep inside torch.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0 disables top-k
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (clamped to [-100, 100])
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must follow (guided.py)
    guided_json: dict[str, Any] | str | None = None  # shorthands for structured_outputs=StructuredOutputsParams(...)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # The grammar state of one sequence: set by `Sequence` on its private copy of the params, read by the sampler.
    guide: Guide | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate every field and normalise `stop` to a list (vLLM accepts str or list)."""
        if not _is_int(self.n) or self.n < 1:
            raise _bad("n", self.n, "must be an integer >= 1")
        if not _is_number(self.temperature) or not self.temperature >= 0.0:
            raise _bad("temperature", self.temperature, "must be a number >= 0")
        if self.temperature == float("inf"):
            raise _bad("temperature", self.temperature, "must be finite")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", self.top_k, "must be an integer: -1 or 0 (disabled) or >= 1")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "must be in (0, 1]")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "must be in [0, 1]")
        rp = self.repetition_penalty
        if not _is_number(rp) or not 0.0 < rp < float("inf"):
            raise _bad("repetition_penalty", rp, "must be a finite number > 0")
        # OpenAI documents [-2, 2]; vLLM enforces the same range.
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise _bad(name, value, "must be in [-2, 2]")
        if self.seed is not None and not _is_int(self.seed):
            raise _bad("seed", self.seed, "must be an integer or None")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise _bad("seed", self.seed, "must fit in a signed 64-bit integer")
        # vLLM rejects max_tokens=0 as well: a request that may generate nothing is a client bug.
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise _bad("max_tokens", self.max_tokens, "must be an integer >= 1 or None")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise _bad("logprobs", self.logprobs, "must be an integer >= 0 or None")
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", self.ignore_eos, "must be a bool")

        if self.stop is None:
            stop: list[str] = []
        elif isinstance(self.stop, str):
            stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            stop = list(self.stop)
        else:
            raise _bad("stop", self.stop, "must be a string, a list of strings or None")
        for s in stop:
            # An empty stop string would "match" before the first token and end every request.
            if not isinstance(s, str) or not s:
                raise _bad("stop", self.stop, "every stop string must be a non-empty string")
        self.stop = stop

        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise _bad("stop_token_ids", self.stop_token_ids, "must be a list of token ids >= 0")
        else:
            self.stop_token_ids = list(self.stop_token_ids)

        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise _bad("logit_bias", self.logit_bias, "must be a dict of token id -> bias")
            bias = {}
            for k, v in self.logit_bias.items():
                if not _is_int(k) or k < 0 or not _is_number(v) or v != v:
                    raise _bad("logit_bias", {k: v}, "keys must be token ids >= 0 and values numbers")
                bias[int(k)] = float(min(max(v, -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS))
            self.logit_bias = bias or None

        shorthands = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")
                      if getattr(self, f"guided_{k}") is not None}
        if shorthands:
            if self.structured_outputs is not None or len(shorthands) > 1:
                names = [f"guided_{k}" for k in shorthands]
                if self.structured_outputs is not None:
                    names.append("structured_outputs")
                raise RequestError(f"only one structured output constraint per request; got {', '.join(names)}")
            self.structured_outputs = StructuredOutputsParams(**shorthands)
            self.guided_json = self.guided_regex = self.guided_choice = self.guided_grammar = None
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad("structured_outputs", self.structured_outputs, "must be a StructuredOutputsParams")

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (typed precisely, unlike the field which also admits str on input)."""
        if isinstance(self.stop, str):  # only if reassigned after construction
            return [self.stop]
        return list(self.stop or [])

    @property
    def greedy(self) -> bool:
        """True when sampling degenerates to argmax, so the sampler can skip the random path."""
        return self.temperature < _SAMPLING_EPS or self.top_k == 1

    @property
    def argmax_only(self) -> bool:
        """Greedy with nothing that reads or changes the logits (bias, grammar, penalties, logprobs): the token is
        the raw logits' argmax, so a model split over ranks may send each rank's best (logit, token) instead of
        its logit columns (`ModelRunner.execute(..., argmax=True)`)."""
        return (self.greedy and not self.logit_bias and self.guide is None and self.logprobs is None
                and self.repetition_penalty == 1.0 and self.frequency_penalty == 0.0 and self.presence_penalty == 0.0)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Return a generator on `device` (where the logits are) seeded from `params.seed`, or None for unseeded ones.

    The caller keeps one generator per sequence for its whole life and passes it at every step:
    a seeded request then draws the same tokens whatever else shares its batch, because only
    that request's rows ever consume its generator. Unseeded requests use torch's global RNG.
    """
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


# --------------------------------------------------------------------------------------------
# Logit transforms. Each takes [B, V] float logits and per-row parameters, returns a new tensor.
# Removed tokens get -inf so a later softmax gives them exactly zero probability.
# --------------------------------------------------------------------------------------------


def _host_any(value: float | torch.Tensor | list[float] | list[int], pred: Callable[[float], bool]) -> bool:
    """Whether any row's value satisfies `pred`, decided on the host for host values: the sampler then
    never waits for the GPU before the one copy of the sampled ids (a tensor is reduced on its device)."""
    if isinstance(value, torch.Tensor):
        return bool(pred(value).any())  # type: ignore[arg-type]
    return any(pred(v) for v in _host_values(value))


def _host_values(value: float | list[float] | list[int]) -> list:
    """A scalar or per-row list of host values, as a list."""
    return value if isinstance(value, list) else [value]


def _per_row(
    value: float | torch.Tensor | list[float] | list[int],
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Broadcast a scalar or per-row list to a [B, 1] tensor so rows can have different values."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"per-row parameter has shape {tuple(t.shape)}, expected ({batch},)")
    return t.reshape(batch, 1)


def _token_matrix(
    token_lists: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Per-row token counts [B, V] built with one scatter_add, so penalties stay vectorised."""
    batch = len(token_lists)
    counts = torch.zeros(batch, vocab_size, dtype=torch.int32, device=device)
    lengths = [len(toks) for toks in token_lists]
    total = sum(lengths)
    if total == 0:
        return counts
    host = [t for toks in token_lists for t in toks]
    bad = next((t for t in host if not 0 <= t < vocab_size), None)  # checked on the host: no device sync
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    flat = torch.tensor(host, dtype=torch.long, device=device)
    rows = torch.repeat_interleave(
        torch.arange(batch, device=device), torch.tensor(lengths, device=device)
    )
    counts.view(-1).scatter_add_(
        0, rows * vocab_size + flat, torch.ones(total, dtype=torch.int32, device=device)
    )
    return counts


def apply_penalties(
    logits: torch.Tensor,
    prev_tokens: list[list[int]],
    output_tokens: list[list[int]],
    repetition_penalty: float | list[float] = 1.0,
    frequency_penalty: float | list[float] = 0.0,
    presence_penalty: float | list[float] = 0.0,
) -> torch.Tensor:
    """Apply the repetition, then frequency and presence penalties (vLLM order).

    * repetition (HF/CTRL style) covers prompt *and* output tokens (`prev_tokens`): a seen
      token's logit is divided by the penalty when positive and multiplied when negative, so a
      penalty > 1 always makes it less likely regardless of sign.
    * frequency/presence (OpenAI style) cover output tokens only:
      ``logit -= frequency * count + presence * (count > 0)``.
    """
    batch, vocab = logits.shape
    if len(prev_tokens) != batch or len(output_tokens) != batch:
        raise ValueError(
            f"got {len(prev_tokens)} prev_tokens / {len(output_tokens)} output_tokens rows "
            f"for {batch} logits rows"
        )
    out = logits
    rep = _per_row(repetition_penalty, batch, logits.dtype, logits.device)
    if _host_any(repetition_penalty, lambda r: r != 1.0):
        seen = _token_matrix(prev_tokens, vocab, logits.device) > 0
        penalised = torch.where(out > 0, out / rep, out * rep)
        out = torch.where(seen, penalised, out)
    freq = _per_row(frequency_penalty, batch, logits.dtype, logits.device)
    pres = _per_row(presence_penalty, batch, logits.dtype, logits.device)
    if _host_any(frequency_penalty, lambda f: f != 0.0) or _host_any(presence_penalty, lambda p: p != 0.0):
        counts = _token_matrix(output_tokens, vocab, logits.device).to(logits.dtype)
        out = out - freq * counts - pres * (counts > 0).to(logits.dtype)
    return out if out is not logits else logits.clone()


def apply_logit_bias(logits: torch.Tensor, biases: list[dict[int, float] | None]) -> torch.Tensor:
    """Add each row's {token id: bias} (OpenAI's logit_bias) to its logits; ids past the vocabulary are skipped."""
    vocab = logits.shape[1]
    rows, cols, vals = [], [], []
    for i, b in enumerate(biases):
        for t, v in (b or {}).items():
            if t < vocab:
                rows.append(i)
                cols.append(t)
                vals.append(v)
    out = logits.clone()
    if rows:
        dev = logits.device
        out.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                       torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return out


def apply_temperature(logits: torch.Tensor, temperature: float | list[float]) -> torch.Tensor:
    """Divide each row by its temperature; rows at (near) zero are left alone (they are argmax).

    Leaving greedy rows untouched instead of dividing by zero keeps the batch free of inf/NaN,
    and argmax is invariant to positive scaling anyway.
    """
    temp = _per_row(temperature, logits.shape[0], logits.dtype, logits.device)
    temp = torch.where(temp < _SAMPLING_EPS, torch.ones_like(temp), temp)
    return logits / temp


def apply_top_k(logits: torch.Tensor, top_k: int | list[int]) -> torch.Tensor:
    """Keep each row's `top_k` largest logits; k <= 0 (or >= V) leaves the row unchanged.

    Tokens tied with the k-th largest value are all kept (the threshold is a value, not a
    count), which matches vLLM's sort-and-threshold implementation.
    """
    batch, vocab = logits.shape
    if not _host_any(top_k, lambda k: 0 < k < vocab):
        return logits.clone()
    k = _per_row(top_k, batch, torch.long, logits.device)
    active = (k > 0) & (k < vocab)
    # Only the largest active k is sorted for, so one disabled row does not force a full sort.
    k = torch.where(active, k, torch.ones_like(k))
    if isinstance(top_k, torch.Tensor):
        largest = int(k.max())
    else:
        largest = max(v for v in _host_values(top_k) if 0 < v < vocab)
    top_vals = torch.topk(logits, largest, dim=-1).values  # sorted descending
    threshold = top_vals.gather(1, k - 1)
    threshold = torch.where(active, threshold, torch.full_like(threshold, float("-inf")))
    return logits.masked_fill(logits < threshold, float("-inf"))


NUCLEUS_CANDIDATES = 1024
"""`apply_top_p` looks for each nucleus among this many most likely tokens first (a partial top-k, ~13x
cheaper than sorting a 150k vocabulary); only rows whose candidates hold less than p of the mass sort it all."""


def apply_top_p(logits: torch.Tensor, top_p: float | list[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most-likely tokens whose probability >= top_p.

    A token is kept when the probability mass strictly before it (in descending order) is
    below p, so the most likely token always survives and the token that crosses p is included.
    Rows with p >= 1 are left unchanged.

    The mass is the row's softmax; it is accumulated over the `NUCLEUS_CANDIDATES` most likely tokens
    (`torch.topk`), which decides every row whose candidates reach p — a language model's usual case, and
    always after a top-k of at most that many. The other rows sort the whole vocabulary. Off the CPU every row
    is sorted (a GPU sorts fast, and choosing rows would wait for the device).
    """
    batch, vocab = logits.shape
    if not _host_any(top_p, lambda p: p < 1.0):
        return logits.clone()
    p = _per_row(top_p, batch, logits.dtype, logits.device)
    if logits.device.type != "cpu":
        return torch.where(p >= 1.0, logits, _top_p_sorted(logits, p))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    vals, idx = torch.topk(logits, min(vocab, NUCLEUS_CANDIDATES), dim=-1)  # sorted descending
    probs = torch.exp(vals - lse)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    keep_sorted = mass_before < p
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, keep_sorted)
    out = torch.where(keep | (p >= 1.0), logits, float("-inf"))
    # a row whose candidates all stay (their mass is below p) may need tokens past them: sort that row
    if vocab > NUCLEUS_CANDIDATES:
        open_rows = (keep_sorted[:, -1] & (p[:, 0] < 1.0)).nonzero().flatten().tolist()
        if open_rows:
            out[open_rows] = _top_p_sorted(logits[open_rows], p[open_rows])
    return out


def _top_p_sorted(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`apply_top_p` of rows [R, V] by a full sort (p [R, 1])."""
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float | list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the row's top probability.

    Unlike top-p this adapts to the model's confidence: a peaked distribution keeps few tokens,
    a flat one keeps many. The most likely token always survives.
    """
    batch, _ = logits.shape
    if not _host_any(min_p, lambda m: m > 0.0):
        return logits.clone()
    m = _per_row(min_p, batch, logits.dtype, logits.device)
    probs = torch.softmax(logits, dim=-1)
    threshold = m * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


@dataclass
class TokenLogprobs:
    """Logprob report for one sampled token, from the raw (unpenalised) logits.

    `top` holds the `params.logprobs` most likely (token_id, logprob) pairs, best first; it is
    empty when logprobs=0, in which case only the chosen token's own logprob is reported.
    """

    token_id: int
    logprob: float
    rank: int  # 1-based rank of the chosen token under the raw distribution
    top: list[tuple[int, float]]


_DRAW_CHUNK = 1024


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `probs` [R, V] (each row's probabilities, any positive scale): inverse-CDF
    sampling with one uniform number u per row — the first token at which the row's running sum exceeds
    u * total.

    `torch.multinomial` (and the exponential race) draw a random number per vocabulary entry: ~44 ms for 16 rows
    of a 150k vocabulary on two cores. Here the running sum is taken in two levels, in float64: the sums of
    1024-token chunks locate u's chunk, and only that chunk is summed token by token (no [R, V] float64
    array). A token of probability 0 is never drawn (the running sum does not grow at it). Row i takes its u
    from `generators[i]` when given (seeded requests: reproducible whatever the batch), else from the global
    generator; nothing waits for the device. A row whose total is not positive and finite (NaN logits) gets
    its first maximum instead."""
    R, V = probs.shape
    if R == 0:
        return torch.empty(0, dtype=torch.long, device=probs.device)
    probs = probs.contiguous()
    CH = _DRAW_CHUNK
    whole = V // CH
    sums = torch.zeros(R, -(-V // CH), dtype=torch.float64, device=probs.device)
    if whole:
        sums[:, :whole] = probs[:, :whole * CH].view(R, whole, CH).sum(-1, dtype=torch.float64)
    if V % CH:
        sums[:, whole] = probs[:, whole * CH:].sum(-1, dtype=torch.float64)
    cum = sums.cumsum(-1)
    total = cum[:, -1:]
    u = torch.rand(R, 1, dtype=torch.float64, device=probs.device)
    for i, gen in enumerate(generators):
        if gen is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=gen, device=gen.device).to(probs.device)
    target = torch.minimum(u * total, total * (1.0 - 2.0 ** -40))  # below the total even if u * total rounds up
    chunk = torch.searchsorted(cum, target, right=True).clamp_(max=sums.shape[1] - 1)  # [R, 1]
    rest = target - (cum.gather(1, chunk) - sums.gather(1, chunk))  # u's place inside its chunk
    cols = chunk * CH + torch.arange(CH, device=probs.device)
    inside = probs.gather(1, cols.clamp(max=V - 1)).masked_fill(cols >= V, 0.0).cumsum(-1, dtype=torch.float64)
    # the two sums round differently: keep `rest` inside the chunk's own total, so the pick has mass
    rest = torch.minimum(rest.clamp(min=0.0), inside[:, -1:] * (1.0 - 2.0 ** -40))
    ids = (cols.gather(1, torch.searchsorted(inside, rest, right=True).clamp_(max=CH - 1))).squeeze(1)
    ok = (total[:, 0] > 0) & torch.isfinite(total[:, 0])
    if probs.device.type == "cpu" and bool(ok.all()):  # the usual case, known without waiting on a CPU
        return ids
    return torch.where(ok, ids, torch.argmax(probs, dim=-1))


class SamplerOutput(NamedTuple):
    """What `Sampler.sample` returns; a tuple so callers may write `ids, lps = sample(...)`."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: list[TokenLogprobs | None]  # one entry per row, None when not requested


class Sampler:
    """Turns a batch of next-token logits into token ids, honouring each row's SamplingParams.

    Rows may carry different parameters: every transform takes per-row values, and a transform
    is skipped entirely when no row uses it, so the common all-default batch costs one softmax.

    `argmax` is the backend's row-wise argmax (the cpu backend's native one is ~10x torch's
    single-threaded reduction over a 150k vocabulary); both pick the first maximum (or the first NaN).
    """

    def __init__(self, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.argmax = argmax or (lambda x: torch.argmax(x, dim=-1))

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prev_tokens: list[list[int]],
        output_tokens: list[list[int]],
    ) -> SamplerOutput:
        """Sample one token per row.

        `prev_tokens` is each row's prompt + output so far (for the repetition penalty),
        `output_tokens` its output only (for frequency/presence). `generators[i]` is consumed
        only by row i, so a seeded row is reproducible independently of its batch-mates.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        for name, seq in (
            ("params", params),
            ("generators", generators),
            ("prev_tokens", prev_tokens),
            ("output_tokens", output_tokens),
        ):
            if len(seq) != batch:
                raise ValueError(f"{name} has {len(seq)} entries for {batch} logits rows")
        if batch == 0:
            return SamplerOutput(torch.empty(0, dtype=torch.long, device=logits.device), [])

        raw = logits.float()
        x = raw  # every transform below returns a new tensor: raw stays intact for the logprobs
        if any(p.logit_bias for p in params):
            x = apply_logit_bias(x, [p.logit_bias for p in params])
        guided = [i for i, p in enumerate(params) if p.guide is not None]
        if guided:  # the grammar's allowed tokens: everything after (greedy or random) picks among them
            x = apply_bitmask(x, guided, fill_bitmask([params[i].guide for i in guided]))
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
               for p in params):
            x = apply_penalties(
                x,
                prev_tokens,
                output_tokens,
                repetition_penalty=[p.repetition_penalty for p in params],
                frequency_penalty=[p.frequency_penalty for p in params],
                presence_penalty=[p.presence_penalty for p in params],
            )

        random_rows = [i for i in range(batch) if not params[i].greedy]
        if len(random_rows) < batch:
            token_ids = self.argmax(x)
        else:  # every row samples: no argmax to take
            token_ids = torch.empty(batch, dtype=torch.long, device=logits.device)
        if random_rows:
            # each filter only when a row uses it (an unused one would still copy the [B, V] logits)
            x = apply_temperature(x, [p.temperature for p in params])
            if any(0 < p.top_k < x.shape[1] for p in params):
                x = apply_top_k(x, [p.top_k for p in params])
            if any(p.top_p < 1.0 for p in params):
                x = apply_top_p(x, [p.top_p for p in params])
            if any(p.min_p > 0.0 for p in params):
                x = apply_min_p(x, [p.min_p for p in params])
            gens = [generators[i] for i in random_rows]
            if len(random_rows) == batch:
                token_ids = draw(torch.softmax(x, dim=-1), gens)
            else:
                rows = torch.tensor(random_rows, device=logits.device)
                token_ids[rows] = draw(torch.softmax(x[rows], dim=-1), gens)

        return SamplerOutput(token_ids, self._logprobs(raw, token_ids, params))

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        """Logprobs of the chosen and top tokens from the raw logits, for rows that asked."""
        result: list[TokenLogprobs | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return result
        idx = torch.tensor(rows, device=raw.device)
        lp = torch.log_softmax(raw[idx], dim=-1)
        chosen = token_ids[idx]
        chosen_lp = lp.gather(1, chosen.unsqueeze(1)).squeeze(1)
        ranks = (lp > chosen_lp.unsqueeze(1)).sum(dim=-1) + 1
        max_k = min(max(params[i].logprobs or 0 for i in rows), lp.shape[1])
        top_vals, top_ids = torch.topk(lp, max_k, dim=-1)  # max_k may be 0: empty columns
        for j, i in enumerate(rows):
            k = min(params[i].logprobs or 0, lp.shape[1])
            top = list(zip(top_ids[j, :k].tolist(), top_vals[j, :k].tolist(), strict=True))
            result[i] = TokenLogprobs(
                token_id=int(chosen[j]),
                logprob=float(chosen_lp[j]),
                rank=int(ranks[j]),
                top=top,
            )
        return result


# --------------------------------------------------------------------------------------------
# Stop strings
# --------------------------------------------------------------------------------------------


class StopChecker:
    """Finds stop strings in detokenised output text and decides how much may be streamed.

    Works on text, not tokens, because a stop string may span several tokens or sit in the
    middle of one token's text; the engine appends each new token's text and calls `check`.
    The stop string itself is never part of the returned text (vLLM's default).
    """

    def __init__(self, stop: list[str]) -> None:
        """`stop` as validated by SamplingParams (non-empty strings); an empty list disables."""
        if any(not s for s in stop):
            raise _bad("stop", stop, "every stop string must be a non-empty string")
        self.stop = list(stop)
        self._max_len = max((len(s) for s in self.stop), default=0)

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopChecker:
        """Build the checker for a request."""
        return cls(params.stop_strings)

    def find(self, text: str, num_new_chars: int | None = None) -> int:
        """Index of the earliest stop string in `text`, or -1.

        `num_new_chars` lets an incremental caller (who has already checked the text minus its
        last `num_new_chars` characters) search only the window where a new match can end,
        keeping the per-token cost independent of the output length.
        """
        if not self.stop:
            return -1
        start = 0
        if num_new_chars is not None:
            start = max(0, len(text) - num_new_chars - self._max_len + 1)
        best = -1
        for s in self.stop:
            pos = text.find(s, start)
            if pos != -1 and (best == -1 or pos < best):
                best = pos
        return best

    def check(self, text: str, num_new_chars: int | None = None) -> tuple[bool, str]:
        """Return (stopped, visible_text).

        When a stop string occurs, visible_text is everything before its first occurrence.
        Otherwise it is all of `text` — the final output if generation ends now for another
        reason (EOS, max_tokens); use `safe_len` to decide how much of it to stream yet.
        """
        pos = self.find(text, num_new_chars)
        if pos == -1:
            return False, text
        return True, text[:pos]

    def safe_len(self, text: str) -> int:
        """How many leading characters of `text` can be streamed without ever being retracted.

        Holds back the longest suffix that is a proper prefix of some stop string (the next
        token might complete it), and never passes a complete stop string.
        """
        pos = self.find(text)
        if pos != -1:
            return pos
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return len(text) - hold
