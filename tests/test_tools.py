"""Tool calling: Hermes-format parsing (whole and streamed), prompts through the chat template, the forcing
grammar, and a round trip with the official client (tool_choice required / named, streaming and not)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from moeserve.chat_template import CHATML_TEMPLATE, ChatTemplate
from moeserve.engine.tools import ToolCallStream, parse_tool_calls, prepare_messages, tool_call_grammar
from tests.openai_server import MODEL, shared_server
from tests.test_chat_template import QWEN_LIKE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, CLOCK]

OUTPUT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
          '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def _calls(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_complete_output() -> None:
    content, calls = parse_tool_calls(OUTPUT)
    assert content == "Let me check."
    assert _calls(calls) == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert parse_tool_calls("no tools here") == ("no tools here", [])
    bad = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(bad) == (bad, [])
    # cut off before the closing tag (EOS): still a call if its JSON is complete
    assert _calls(parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n')[1]) == [("f", {"a": 1})]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 11, 1000])
def test_stream_parser_matches_whole_parse(size: int) -> None:
    p, content, calls = ToolCallStream(), "", []
    for i in range(0, len(OUTPUT), size):
        text, new = p.feed(OUTPUT[i:i + size])
        content, calls = content + text, calls + new
        assert "<" not in content  # a possible tag start is never sent as content
    text, new = p.finish()
    content, calls = content + text, calls + new
    assert content.strip() == "Let me check." and [c["index"] for c in calls] == [0, 1]
    assert _calls(calls) == _calls(parse_tool_calls(OUTPUT)[1])
    one = ToolCallStream(max_calls=1)
    assert [c["index"] for c in one.feed(OUTPUT)[1] + one.finish()[1]] == [0]
    plain = ToolCallStream()
    assert plain.feed("a < b <tool")[0] == "a < b " and plain.finish() == ("<tool", [])


def test_prompts_through_the_models_template() -> None:
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    # a template that knows tools renders them itself; arguments reach it as an object, not JSON text
    m, tools = prepare_messages(msgs, TOOLS, QWEN_LIKE)
    text = ChatTemplate(QWEN_LIKE).render(m, tools=tools)
    assert tools == TOOLS and '"name": "get_weather"' in text and '"description": "The time now"' in text
    assert '"arguments": {"city": "Paris", "days": 1}' in text and "<tool_response>" in text
    # ChatML ignores tools: the Hermes system prompt and inline calls / responses stand in
    m, tools = prepare_messages(msgs, TOOLS, CHATML_TEMPLATE)
    text = ChatTemplate(None).render(m, tools=tools)
    assert tools is None and text.startswith("<|im_start|>system\n# Tools") and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 1}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text


def test_forcing_grammar_rejects_bad_schemas() -> None:
    from moeserve.engine.guided import StructuredOutputsParams
    from moeserve.errors import RequestError

    StructuredOutputsParams(grammar=tool_call_grammar(TOOLS))
    with pytest.raises(RequestError, match="not in tools"):
        tool_call_grammar(TOOLS, "nope")
    bad = {"type": "function", "function": {"name": "x", "parameters": {"type": "strange"}}}
    with pytest.raises(RequestError):
        StructuredOutputsParams(grammar=tool_call_grammar([bad]))


def test_tool_call_round_trip() -> None:
    c = shared_server().client()
    msgs = [{"role": "system", "content": "You can call tools."}, {"role": "user", "content": "Weather in Oslo?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp = c.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=named, max_tokens=200,
                                     temperature=1.0, seed=11)
    ch = resp.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and len(ch.message.tool_calls) == 1
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the same request streamed: the client's deltas assemble into the same call
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=named,
                                            max_tokens=200, temperature=1.0, seed=11, stream=True))
    deltas = [d for x in chunks for d in (x.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0] and deltas[0].function.name == "get_weather"
    assert deltas[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(x.choices[0].delta.content or "" for x in chunks)
    # required: some tool of the list, each call valid; several prompts' worth of samples
    for seed in range(4):
        r = c.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=seed)
        (tc,) = r.choices[0].message.tool_calls
        args = json.loads(tc.function.arguments)
        if tc.function.name == "get_weather":
            jsonschema.validate(args, WEATHER["function"]["parameters"])
        else:
            assert tc.function.name == "get_time" and args == {}
    # the call and its result go back into the conversation (the assistant message as the client returned it)
    follow = msgs + [ch.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp": -3}'}]
    auto = dict(model=MODEL, messages=follow, tools=TOOLS, max_tokens=30, temperature=0.0)
    again = c.chat.completions.create(**auto)
    assert again.choices[0].finish_reason in ("length", "stop") and again.choices[0].message.content
    streamed = c.chat.completions.create(**auto, stream=True)
    assert "".join(x.choices[0].delta.content or "" for x in streamed) == again.choices[0].message.content
    # tool_choice none: no tools offered, nothing parsed
    none = c.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("kwargs, needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
])
def test_tool_errors_are_400(kwargs: dict, needle: str) -> None:
    args = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 4,
            **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        shared_server().client().chat.completions.create(**args)
    assert err.value.status_code == 400 and needle in err.value.message



def test_llm_chat_parses_tool_calls_and_takes_template_kwargs() -> None:
    """The Python API: forced calls come back in `tool_calls`; chat_template_kwargs reach the template."""
    from moeserve import LLM, SamplingParams
    from tests.openai_server import model_path

    llm = LLM(str(model_path()), max_model_len=2048)
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=3,
                            guided_grammar=tool_call_grammar(TOOLS, "get_weather", parallel=False))
    (out,) = llm.chat(msgs, params, tools=TOOLS)
    (call,) = out.outputs[0].tool_calls
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert "<tool_call>" not in out.outputs[0].text
    (plain,) = llm.chat(msgs, SamplingParams(max_tokens=4, temperature=0.0))  # without tools nothing is parsed
    assert plain.outputs[0].tool_calls is None
    # template variables (Qwen3's enable_thinking), as the server's chat_template_kwargs
    llm.engine.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                                "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}")
    llm.engine.__dict__.pop("_chat_template", None)  # compiled lazily: recompile with the new source
    assert llm.render_chat(msgs, enable_thinking=False).endswith("<no-think>")
    assert not llm.render_chat(msgs).endswith("<no-think>")


def test_server_chat_template_kwargs() -> None:
    c = shared_server().client()
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.role == "assistant"
