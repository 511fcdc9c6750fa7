"""Chat-template rendering compatible with ``transformers.apply_chat_template``.

A GGUF stores the model's Jinja chat template under ``tokenizer.chat_template``. Templates are
written against the environment ``transformers`` builds, so that is reproduced here: the same
sandbox (``ImmutableSandboxedEnvironment``, ``trim_blocks``/``lstrip_blocks``), the same variables
(``messages``, ``tools``, ``documents``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
plus any extra keyword such as ``enable_thinking``) and the same helpers (``raise_exception``,
``strftime_now``, a ``tojson`` that does not HTML-escape, ``{% generation %}`` blocks, loop
controls). A template rendered here gives the same prompt string as with ``transformers``.

Templates are untrusted code from a downloaded file, so the sandbox is tightened: touching an
unsafe attribute (``''.__class__``) raises at once instead of silently rendering as empty.
Errors are reported as moeserve errors: a template that does not compile is a
:class:`~moeserve.errors.GGUFError` (the file is broken); anything raised while rendering (a
template's own ``raise_exception("roles must alternate")``, a missing message field, a sandbox
violation) is a :class:`~moeserve.errors.RequestError`, because it fails that one request.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moeserve.errors import GGUFError, RequestError

__all__ = ["CHATML_TEMPLATE", "ChatTemplate"]

#: Used when the GGUF has no ``tokenizer.chat_template``; the ChatML format transformers used as
#: its default template (and that llama-server falls back to).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _TemplateRaised(TemplateError):
    """Raised by ``raise_exception()`` inside a template: the template rejects the input."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """``tojson`` as transformers defines it: plain ``json.dumps`` (Jinja's escapes ``<>&'``,
    which would corrupt tool schemas shown to the model)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself (no ``dict.__subclasses__``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed names, which could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as Jinja's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates may not set underscore-prefixed namespace attributes ({name!r})")


class _GenerationTag(jinja2.ext.Extension):
    """Accept ``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker) and
    render its body unchanged; without it such templates would not even compile."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return str(caller())


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, but unsafe attribute access is an error rather than ``Undefined``.

    The stock sandbox turns ``''.__class__`` into an undefined value that prints as nothing, which
    hides a hostile template. Templates in the wild do not rely on that (transformers runs the same
    sandbox), so failing loudly costs no compatibility.
    """

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """`'x' * 10**9` would allocate a gigabyte per request: repetition and powers are bounded."""
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                    raise SecurityError(f"repeating a sequence of {len(seq)} items {n} times exceeds the limit")
        if operator == "**" and isinstance(right, int) and abs(right) > 1024:
            raise SecurityError(f"power with exponent {right} exceeds the limit")
        return super().call_binop(context, operator, left, right)


MAX_OUTPUT_CHARS = 1 << 24
"""The largest prompt a template may render (16 Mi characters, twice the largest request body)."""
MAX_STEPS = 2_000_000
"""Lines of compiled template code one render may execute (nested `range(100000)` loops would run for hours)."""
MAX_SECONDS = 2.0
"""Wall time one render may take."""


class _Budget:
    """What one render may still spend. Jinja compiles a template to Python code (file name "<template>"):
    a trace function on the rendering thread counts its executed lines and checks the clock every 1024,
    so any loop — over `range`, a string, a list — is bounded, not only `range`."""

    def __init__(self) -> None:
        self.steps, self.deadline = MAX_STEPS, time.monotonic() + MAX_SECONDS

    def __call__(self, frame: Any, event: str, arg: Any) -> Any:  # the global trace function: new frames
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        self.steps -= 1
        if not self.steps & 1023:
            if self.steps < 0:
                raise SecurityError(f"the chat template ran more than {MAX_STEPS} steps")
            if time.monotonic() > self.deadline:
                raise SecurityError(f"the chat template ran longer than {MAX_SECONDS} s")
        return self._line


def _make_environment() -> _StrictSandbox:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Deep-copy request data into plain JSON types so templates can only see str/int/list/dict...

    Callers may pass pydantic models or str subclasses (enums) whose methods the sandbox does not
    know are harmful; rebuilding as builtins removes them and protects the caller's objects from
    template side effects.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models (e.g. server request bodies)
        return _plain(value.model_dump())
    raise RequestError(f"chat messages may only contain JSON-like values, found {type(value).__name__}")


class ChatTemplate:
    """A compiled chat template.

    ``template`` is the Jinja source (``Tokenizer.chat_template``); None selects ChatML.
    ``bos_token``/``eos_token`` are the token *texts* templates interpolate (``None`` -> ``""``).
    ``source`` names where the template came from and ``field`` what it is, for error messages.
    """

    def __init__(
        self,
        template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        source: str = "<gguf>",
        field: str = "tokenizer.chat_template",
    ) -> None:
        self.is_fallback = template is None
        self.source = source
        self.template_source = CHATML_TEMPLATE if template is None else template
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        try:
            self._template = _make_environment().from_string(self.template_source)
        except TemplateSyntaxError as exc:
            raise GGUFError(
                f"{source}: {field} does not compile: {exc.message} (template line {exc.lineno})"
            ) from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for ``messages`` (OpenAI-style ``{"role", "content", ...}`` dicts).

        ``tools`` are JSON-schema tool definitions passed to the template unchanged; extra keyword
        arguments (``documents``, ``enable_thinking``, ...) become template variables, as in
        ``apply_chat_template``. Message keys whose value is None are dropped first, because
        OpenAI clients send ``"content": null`` alongside ``tool_calls`` and templates test for a
        missing key, not for None.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise RequestError("messages must be a list of {'role': ..., 'content': ...} objects")
        chat = []
        for i, message in enumerate(messages):
            message = _plain(message)
            if not isinstance(message, dict):
                raise RequestError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r:.80}")
            chat.append({k: v for k, v in message.items() if v is not None})
        variables: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "documents": None,
            **{k: _plain(v) for k, v in kwargs.items()},
            "messages": chat,
            "tools": None if tools is None else _plain(list(tools)),
            "add_generation_prompt": bool(add_generation_prompt),
        }
        budget, previous = _Budget(), sys.gettrace()
        sys.settrace(budget)
        try:
            parts, size = [], 0
            for piece in self._template.generate(**variables):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise SecurityError(f"the rendered prompt exceeds {MAX_OUTPUT_CHARS} characters")
                parts.append(piece)
            return "".join(parts)
        except _TemplateRaised as exc:
            raise RequestError(f"the chat template rejected the conversation: {exc.message}") from exc
        except SecurityError as exc:
            raise RequestError(f"{self.source}: chat template attempted an unsafe operation: {exc}") from exc
        except TemplateError as exc:
            raise RequestError(f"{self.source}: chat template failed to render: {type(exc).__name__}: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                RecursionError, MemoryError) as exc:
            # e.g. "'+' on str and list" when a message's content is a list of parts
            raise RequestError(f"{self.source}: chat template failed to render: {type(exc).__name__}: {exc}") from exc
        finally:
            sys.settrace(previous)

    def __repr__(self) -> str:
        kind = "ChatML fallback" if self.is_fallback else f"{len(self.template_source)} chars"
        return f"ChatTemplate({self.source!r}, {kind})"
