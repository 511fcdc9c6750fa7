"""One generation request's state: tokens so far, sampling state, detokenized text, finish rule."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from moeserve.engine.guided import Guide
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.engine.sampling import SamplingParams, StopChecker, TokenLogprobs, make_generator
from moeserve.errors import RequestError


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    index: int = 0  # which of the request's n completions
    eos_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    generator: torch.Generator | None = None
    device: torch.device | str = "cpu"  # where the logits live: a seeded generator is made there
    tokenizer: object | None = None  # the model's tokenizer (a structured-output grammar is built over it)
    stopper: StopChecker | None = None
    detok: object | None = None  # tokenizer.StreamDecoder when text is wanted
    streamed: int = 0  # characters of `text` already handed to a stream

    def __post_init__(self) -> None:
        seeded = self.params if self.params.seed is None else _offset_seed(self.params, self.index)
        self.generator = make_generator(seeded, self.device)
        self.stopper = StopChecker.from_params(self.params)
        if self.params.structured_outputs is not None:
            if not self.eos_ids:
                raise RequestError("structured output needs a model with a tokenizer that has an end-of-sequence "
                                   "token")
            # Each sequence (of n) walks its own grammar: it gets a private copy of the params holding its Guide,
            # which is how the sampler finds it.
            self.params = copy.copy(self.params)
            self.params.guide = Guide(self.params.structured_outputs, self.tokenizer)

    @property
    def guide(self) -> Guide | None:
        return self.params.guide

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, lp: TokenLogprobs | None, capacity: int) -> None:
        """Add a sampled token and update the text and the finish state."""
        p = self.params
        self.output_ids.append(token)
        if lp is not None:
            self.logprobs.append({**dict(lp.top), token: lp.logprob})
            self.cumulative_logprob += lp.logprob
        guide = p.guide
        if guide is not None:
            guide.accept(token)
        # A guided sequence samples EOS only where its grammar may end: it ends there even with ignore_eos.
        stop_token = token in p.stop_token_ids or (token in self.eos_ids and (not p.ignore_eos or guide is not None))
        if stop_token:
            self.finish_reason = "stop"
            self.stop_reason = token if token in p.stop_token_ids else None
        elif self.detok is not None:
            new = self.detok.push(token)
            self.text += new
            if self.stopper.stop:
                pos = self.stopper.find(self.text, len(new))
                if pos != -1:
                    self.stop_reason = next(x for x in self.stopper.stop if self.text.startswith(x, pos))
                    self.text, self.finish_reason = self.text[:pos], "stop"
                    return
        if self.finish_reason is None and guide is not None and guide.finished:
            self.finish_reason = "stop"  # the grammar is complete (or, never expected, its matcher failed)
        if self.finish_reason is None and (
            (p.max_tokens is not None and len(self.output_ids) >= p.max_tokens) or self.length >= capacity
        ):
            self.finish_reason = "length"
        if self.finished and self.detok is not None:
            self.text += self.detok.flush()

    def stream_delta(self) -> str:
        """Text that may be streamed now and will never be retracted (stop-string prefixes held)."""
        end = len(self.text) if self.finished else self.stopper.safe_len(self.text)
        delta = self.text[self.streamed:end]
        self.streamed = max(self.streamed, end)
        return delta

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index, text=self.text, token_ids=list(self.output_ids), finish_reason=self.finish_reason,
            cumulative_logprob=self.cumulative_logprob if self.params.logprobs is not None else None,
            logprobs=self.logprobs if self.params.logprobs is not None else None, stop_reason=self.stop_reason,
        )


def _offset_seed(params: SamplingParams, index: int) -> SamplingParams:
    """Completion i of an n>1 request uses seed+i, so the n samples differ but stay reproducible."""
    return replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)  # wraps within 64 bits


def request_output(seqs: list[Sequence]) -> RequestOutput:
    first = seqs[0]
    return RequestOutput(
        request_id=first.request_id, prompt=first.prompt, prompt_token_ids=list(first.prompt_ids),
        outputs=[s.completion() for s in seqs], finished=all(s.finished for s in seqs),
        num_cached_tokens=first.num_cached_tokens,
    )
