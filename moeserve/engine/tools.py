"""Tool calling for /v1/chat/completions: prompts, the forcing grammar, and parsing the model's calls.

The format is Hermes / Qwen2.5 / Qwen3's, which those models' own chat templates teach them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

* Prompt: `tools` go to the model's chat template, which renders them as it was trained to see them.
  A template that never mentions `tools` (ChatML, SmolLM2...) would silently drop them, so then the
  Hermes system prompt describing them is put in front of the conversation instead; likewise assistant
  `tool_calls` and `tool` results are written into the messages' text when the template does not
  render `tool_calls` itself. Assistant `tool_calls` arguments arrive as JSON text (OpenAI) and are
  handed to templates as objects, as vLLM and transformers do.
* `tool_choice`: "none" renders no tools and parses nothing; "auto" lets the model choose and parses
  what it wrote; "required" and a named function are enforced by a grammar (`tool_call_grammar`): the
  output is one or more calls (exactly one for a named function or `parallel_tool_calls: false`), each
  of a given function with arguments matching its JSON schema.
* Output: complete `<tool_call>` blocks whose JSON has a "name" and an object "arguments" become
  OpenAI `tool_calls` (arguments re-serialised as JSON text); anything else stays content.
  `ToolCallStream` does the same on a stream of text deltas, holding back what may be the start of a
  tag, and emitting each call whole once its closing tag arrives.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from moeserve.engine.guided import DEFAULT_WHITESPACE
from moeserve.errors import RequestError

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)

HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> \
XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- prompt -----------------------------------------------------------------------------------------

def prepare_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                     template: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages and tools ready for `template` (the chat template's Jinja source); see the module doc."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # not JSON: the template gets the text as sent
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
        out.append(m)
    if "tool_calls" not in template:
        out = [_inline_tool_messages(m) for m in out]
    if tools and "tools" not in template:
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": system})
        tools = None
    return out, tools


def _inline_tool_messages(m: dict[str, Any]) -> dict[str, Any]:
    """Hermes text for a template that cannot render tool calls / results itself."""
    if m.get("tool_calls"):
        blocks = [f"{START}\n" + json.dumps({"name": (c.get("function") or {}).get("name"),
                                             "arguments": (c.get("function") or {}).get("arguments", {})},
                                            ensure_ascii=False) + f"\n{END}" for c in m["tool_calls"]]
        text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        m = {k: v for k, v in m.items() if k != "tool_calls"}
        m["content"] = text
    elif m.get("role") == "tool":
        m = {**m, "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
    return m


# -- forcing ----------------------------------------------------------------------------------------

def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function") or {}


def tool_call_grammar(tools: list[dict[str, Any]], name: str | None = None, parallel: bool = True) -> str:
    """Lark grammar (llguidance dialect) for output made only of tool calls: of `name` when given (one
    call), else of any of `tools` (one or more calls, one when not `parallel`)."""
    chosen = [t for t in tools if name is None or _function(t).get("name") == name]
    if not chosen:
        raise RequestError(f"tool_choice names the function {name!r}, which is not in tools")
    alts = []
    for i, t in enumerate(chosen):
        fn = _function(t)
        params = fn.get("parameters")
        if params is None:  # OpenAI: no parameters means an empty parameter list
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": {"whitespace_pattern": DEFAULT_WHITESPACE}}
        alts.append(f"fn_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
    repeat = ' ("\\n" call)*' if parallel and name is None else ""
    lines = [f"start: call{repeat}",
             'call: "<tool_call>\\n" (' + " | ".join(f"fn_{i}" for i in range(len(alts))) + ') "\\n</tool_call>"',
             *alts]
    return "\n".join(lines) + "\n"


# -- parsing ----------------------------------------------------------------------------------------

def _parse_call(body: str) -> dict[str, Any] | None:
    """One OpenAI tool call from the JSON inside a <tool_call> block, or None if it is not one."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(args, dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a complete output. Without a valid call the text is returned unchanged."""
    calls, rest, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _parse_call(m.group(1))
        if call is None:
            continue
        calls.append(call)
        rest.append(text[pos:m.start()])
        pos = m.end()
    tail = text[pos:]
    if tail.lstrip().startswith(START):  # cut off before its closing tag (EOS or a stop string)
        call = _parse_call(tail.lstrip()[len(START):])
        if call is not None:
            calls.append(call)
            tail = ""
    if not calls:
        return text, []
    content = ("".join(rest) + tail).strip()
    return content or None, calls


class ToolCallStream:
    """`parse_tool_calls` over text deltas: `feed` returns the content that is safe to send and the calls
    completed so far (OpenAI stream deltas, numbered by "index"); `finish` returns what was held back.
    Whitespace between calls is dropped; calls past `max_calls` are dropped."""

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.buf, self.in_call, self.n_calls, self.held = "", False, 0, ""

    def _content(self, text: str) -> str:
        """Whitespace-only content is held until something else follows (it may only separate calls)."""
        if not text:
            return ""
        if not text.strip():
            self.held += text
            return ""
        out, self.held = self.held + text, ""
        return out

    def _call(self, call: dict[str, Any], calls: list[dict[str, Any]]) -> None:
        self.held = ""
        if self.max_calls is None or self.n_calls < self.max_calls:
            calls.append({"index": self.n_calls, **call})
            self.n_calls += 1

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buf += text
        content, calls = "", []
        while True:
            if not self.in_call:
                i = self.buf.find(START)
                if i == -1:
                    keep = next((k for k in range(min(len(START) - 1, len(self.buf)), 0, -1)
                                 if self.buf.endswith(START[:k])), 0)
                    content += self._content(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content += self._content(self.buf[:i])
                self.buf, self.in_call = self.buf[i + len(START):], True
            else:
                j = self.buf.find(END)
                if j == -1:
                    break
                body, self.buf, self.in_call = self.buf[:j], self.buf[j + len(END):], False
                call = _parse_call(body)
                if call is None:
                    content += self._content(START + body + END)
                else:
                    self._call(call, calls)
        return content, calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """End of output: a call cut off before its closing tag still counts if its JSON is complete."""
        calls: list[dict[str, Any]] = []
        if self.in_call:
            call = _parse_call(self.buf)
            if call is not None:
                self._call(call, calls)
                rest = ""
            else:
                rest = START + self.buf
        else:
            rest = self.buf
        out = ("" if self.n_calls and not rest.strip() else self.held) + rest
        self.buf, self.in_call, self.held = "", False, ""
        return out, calls
