"""OpenAI request bodies (plus vLLM's extra sampling fields) and their mapping to SamplingParams.

Pydantic checks the JSON types (a string where a number belongs is a 400, not a crash deep in
the sampler); `SamplingParams` then checks the ranges, so every limit is enforced in one place
for the offline API and the server alike.

Fields that OpenAI or vLLM define but moeserve does not implement (`UNSUPPORTED`) are a 400 naming
the field whenever they ask for something other than the default behaviour — never silently
dropped. Fields nobody defines are ignored with a logged warning, as vLLM does, so clients that send
newer, harmless fields keep working.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from moeserve.engine import tools as tool_calls
from moeserve.engine.guided import StructuredOutputsParams
from moeserve.engine.sampling import SamplingParams
from moeserve.errors import RequestError

log = logging.getLogger("moeserve.server")

MAX_N = 128  # completions per request: each one is a sequence holding KV blocks
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_SEQUENCES = 256  # prompts x n: one request must not queue enough work to starve everyone else
MAX_LOGPROBS = 20  # as vLLM; OpenAI allows 5 (completions) / 20 (chat top_logprobs)


Number = StrictFloat | StrictInt  # JSON numbers; `true` is not 1.0


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# Defined by OpenAI or vLLM, not implemented here: accepted only with these (default-behaviour) values.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "suffix": (None, ""), "functions": (None,), "function_call": (None,),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "store": (None, False),
    "use_beam_search": (None, False), "length_penalty": (None, 1.0), "min_tokens": (None, 0),
    "include_stop_str_in_output": (None, False), "prompt_logprobs": (None,), "allowed_token_ids": (None,),
    "bad_words": (None, []), "truncate_prompt_tokens": (None,), "logits_processors": (None,),
    "chat_template": (None,), "documents": (None,),
    "continue_final_message": (None, False), "return_tokens_as_token_ids": (None, False),
    "prompt_embeds": (None,), "guided_decoding_backend": (None, "llguidance", "guidance", "auto"),
    "echo": (None, False), "skip_special_tokens": (None, False), "priority": (None, 0),
}
_warned: set[str] = set()

_STRUCTURED_KEYS = frozenset({"json", "regex", "choice", "grammar", "json_object", "whitespace_pattern"})


def _as_list(value: Any, field: str) -> list[str | list[int]]:
    """A prompt/input field (a text, token ids, or a list of either) as a list of texts and id lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise RequestError(f"{field} is empty")
    if isinstance(value[0], int):
        return [list(value)]
    return list(value)


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

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
    logit_bias: dict[StrictStr, Number] | None = None
    # structured output: OpenAI's response_format, or vLLM's guided_* fields / structured_outputs object
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None
    structured_outputs: dict[str, Any] | None = None

    model_config = ConfigDict(extra="allow")

    def check_unsupported(self) -> None:
        """400 for a defined-but-unimplemented field set to a non-default value; log fields nobody defines."""
        for name, value in (self.model_extra or {}).items():
            neutral = UNSUPPORTED.get(name)
            if neutral is None:
                if name not in _warned:
                    _warned.add(name)
                    log.warning("request field %r is not an OpenAI/vLLM field moeserve knows; ignored", name)
            elif name == "best_of" and value == self.n:
                continue
            elif not any(value == v and type(value) is not bool or value is v for v in neutral):
                raise RequestError(f"{name} is not supported by this server (got {value!r:.100})")

    def structured(self) -> StructuredOutputsParams | None:
        """The one output constraint this request asks for, if any (RequestError names conflicting fields)."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise RequestError("response_format json_schema needs json_schema.schema")
            found.append(("response_format", {"json": rf.json_schema.schema_}))
        for key in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{key}")
            if value is not None:
                found.append((f"guided_{key}", {key: value}))
        if self.structured_outputs is not None:
            bad = set(self.structured_outputs) - _STRUCTURED_KEYS
            if bad:
                raise RequestError(f"structured_outputs.{sorted(bad)[0]} is not supported; use one of "
                                   f"{', '.join(sorted(_STRUCTURED_KEYS))}")
            found.append(("structured_outputs", {k: v for k, v in self.structured_outputs.items() if v is not None}))
        if len(found) > 1:
            raise RequestError(f"only one output constraint per request; got {', '.join(f for f, _ in found)}")
        if self.guided_whitespace_pattern is not None:
            if not found:
                raise RequestError("guided_whitespace_pattern needs a JSON constraint")
            found[0][1].setdefault("whitespace_pattern", self.guided_whitespace_pattern)
        if not found:
            return None
        field, spec = found[0]
        try:
            return StructuredOutputsParams(**spec)
        except TypeError as exc:  # a wrongly typed structured_outputs member
            raise RequestError(f"invalid {field}: {exc}") from None
        except RequestError as exc:
            raise RequestError(f"{field}: {exc}") from None

    def bias(self) -> dict[int, float] | None:
        if self.logit_bias is None:
            return None
        out = {}
        for k, v in self.logit_bias.items():
            if not k.strip().isdigit():
                raise RequestError(f"logit_bias keys must be token ids, got {k!r}")
            out[int(k)] = v
        return out

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured: StructuredOutputsParams | None = None) -> SamplingParams:
        """Build (and so validate) the SamplingParams; raises RequestError naming the bad field."""
        self.check_unsupported()
        if self.n > MAX_N:
            raise RequestError(f"n={self.n} is too large; at most {MAX_N} completions per request")
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise RequestError(f"logprobs={logprobs} is too large; at most {MAX_LOGPROBS} alternatives per token")
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                               "frequency_penalty", "repetition_penalty")
                 if getattr(self, k) is not None}
        own = self.structured()
        if own is not None and structured is not None:
            raise RequestError("tool_choice 'required' or a named function cannot be combined with another output "
                               "constraint (response_format, guided_*)")
        return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              max_tokens=max_tokens, logprobs=logprobs, ignore_eos=self.ignore_eos,
                              logit_bias=self.bias(), structured_outputs=own or structured, **given)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        out = _as_list(self.prompt, "prompt")
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


class FunctionDef(BaseModel):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. {"enable_thinking": false}

    def template_kwargs(self) -> dict[str, Any]:
        """`chat_template_kwargs` checked: names that are not the template's own inputs."""
        kw = self.chat_template_kwargs or {}
        reserved = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
        for key in kw:
            if key in reserved or not key.isidentifier():
                raise RequestError(f"chat_template_kwargs: {key!r} is not a template variable a request may set "
                                   f"(reserved: {', '.join(sorted(reserved))})")
        return kw

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as plain dicts (what templates and the grammar see), unset fields left out."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def tool_mode(self) -> str | None:
        """None (no tools), 'none', 'auto', 'required' or the forced function's name (validated)."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none"):
                raise RequestError("tool_choice needs tools")
            return None
        if choice is None:
            return "auto"
        if isinstance(choice, str):
            return choice
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RequestError('tool_choice must be "none", "auto", "required" or '
                               '{"type": "function", "function": {"name": ...}}')
        if fn["name"] not in {t.function.name for t in self.tools}:
            raise RequestError(f"tool_choice names the function {fn['name']!r}, which is not in tools")
        return fn["name"]

    def to_sampling_params(self) -> SamplingParams:
        if not self.messages:
            raise RequestError("messages is empty")
        for i, m in enumerate(self.messages):
            if m.role == "tool" and not isinstance((m.model_extra or {}).get("tool_call_id"), str):
                raise RequestError(f"messages[{i}]: a message with role 'tool' needs a tool_call_id")
            calls = (m.model_extra or {}).get("tool_calls")
            if calls is not None and (m.role != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)):
                raise RequestError(f"messages[{i}].tool_calls must be a list of {{'id', 'type': 'function', "
                                   "'function': {'name', 'arguments'}} on an assistant message")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise RequestError(f"top_logprobs={self.top_logprobs} must be between 0 and 20")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        forced = None
        mode = self.tool_mode()
        if mode not in (None, "none", "auto"):
            grammar = tool_calls.tool_call_grammar(self.tool_dicts() or [], None if mode == "required" else mode,
                                                   parallel=self.parallel_tool_calls is not False)
            try:
                forced = StructuredOutputsParams(grammar=grammar)
            except RequestError as exc:
                raise RequestError(f"tools: a parameters schema cannot be enforced: {exc}") from None
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, forced)


MAX_EMBEDDING_INPUTS = 256  # inputs in one /v1/embeddings request: each is a full forward


class EmbeddingRequest(BaseModel):
    """/v1/embeddings: OpenAI's fields, plus `pooling` ("last" or "mean") and `normalize` (default true)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None
    pooling: Literal["last", "mean"] = "last"
    normalize: StrictBool = True

    def inputs(self, hidden_size: int) -> list[str | list[int]]:
        for name in self.model_extra or {}:
            if name in UNSUPPORTED or name == "add_special_tokens":
                raise RequestError(f"{name} is not supported by /v1/embeddings")
            if name not in _warned:
                _warned.add(name)
                log.warning("request field %r is not an OpenAI/vLLM field moeserve knows; ignored", name)
        if self.dimensions is not None and self.dimensions != hidden_size:
            raise RequestError(f"dimensions={self.dimensions} is not supported: this model's embeddings have "
                               f"{hidden_size} dimensions")
        out = _as_list(self.input, "input")
        if len(out) > MAX_EMBEDDING_INPUTS:
            raise RequestError(f"input holds {len(out)} items; at most {MAX_EMBEDDING_INPUTS} per request")
        for i, item in enumerate(out):
            if not item:
                raise RequestError(f"input[{i}] is empty")
        return out
