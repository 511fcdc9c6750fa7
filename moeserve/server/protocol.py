"""OpenAI request bodies (plus vLLM's extra sampling fields) and their mapping to SamplingParams.

Pydantic checks the JSON types (a string where a number belongs is a 400, not a crash deep in
the sampler); `SamplingParams` then checks the ranges, so every limit is enforced in one place
for the offline API and the server alike. Unknown fields are ignored, as vLLM does, so clients
that send newer OpenAI fields keep working.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from moeserve.engine.sampling import SamplingParams
from moeserve.errors import RequestError

MAX_N = 128  # completions per request: each one is a sequence holding KV blocks
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_SEQUENCES = 256  # prompts x n: one request must not queue enough work to starve everyone else
MAX_LOGPROBS = 20  # as vLLM; OpenAI allows 5 (completions) / 20 (chat top_logprobs)


Number = StrictFloat | StrictInt  # JSON numbers; `true` is not 1.0


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    user: StrictStr | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Build (and so validate) the SamplingParams; raises RequestError naming the bad field."""
        if self.n > MAX_N:
            raise RequestError(f"n={self.n} is too large; at most {MAX_N} completions per request")
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise RequestError(f"logprobs={logprobs} is too large; at most {MAX_LOGPROBS} alternatives per token")
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                               "frequency_penalty", "repetition_penalty")
                 if getattr(self, k) is not None}
        return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              max_tokens=max_tokens, logprobs=logprobs, ignore_eos=self.ignore_eos, **given)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            out: list[str | list[int]] = [p]
        elif not p:
            raise RequestError("prompt is empty")
        elif isinstance(p[0], int):
            out = [list(p)]  # type: ignore[arg-type]
        else:
            out = list(p)  # type: ignore[arg-type]
        if any(len(x) == 0 for x in out):
            raise RequestError("prompt is empty")
        if len(out) > MAX_PROMPTS:
            raise RequestError(f"prompt holds {len(out)} prompts; at most {MAX_PROMPTS} per request")
        if len(out) * self.n > MAX_SEQUENCES:
            raise RequestError(f"{len(out)} prompts x n={self.n} = {len(out) * self.n} sequences; at most "
                               f"{MAX_SEQUENCES} per request")
        return out

    def to_sampling_params(self) -> SamplingParams:
        if self.echo:
            raise RequestError("echo is not supported")
        return self.sampling_params(self.max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text parts joined into one string."""
        msg = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError(f"unsupported message content part {part.get('type')!r}; only text parts")
                parts.append(part["text"])
            msg["content"] = "".join(parts)
        msg.setdefault("content", "")
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: StrictBool = True

    def to_sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise RequestError("messages is empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise RequestError(f"top_logprobs={self.top_logprobs} must be between 0 and 20")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
