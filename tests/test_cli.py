"""The `moeserve` command line: generate / --stream / chat / inspect / serve and its error contract.

Most tests run the typer app in-process (CliRunner: stdin and stderr are not terminals, so no
progress bar and `chat` reads scripted lines); the error-contract tests also run the real
interpreter (`python -m moeserve.cli`) to prove no traceback ever reaches the user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeserve import LLM, SamplingParams
from moeserve.cli import app
from moeserve.engine.llm import default_model_path
from moeserve.gguf.reader import GGUFFile

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
GREEDY = ["--temperature", "0", "--repetition-penalty", "1", "-q"]


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def run_subprocess(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "moeserve.cli", *args], capture_output=True, text=True, input=input,
                          env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def llm(tiny_moe: Path) -> LLM:
    return LLM(str(tiny_moe))


def greedy_text(llm: LLM, prompt, n: int) -> str:
    return llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n))[0].outputs[0].text


def assert_one_line_error(stderr: str) -> None:
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("moeserve: error: "), stderr
    assert "Traceback" not in stderr


# -- generate ----------------------------------------------------------------------------------


def test_generate_greedy_prints_the_engines_text(tiny_moe, llm):
    r = run("generate", str(tiny_moe), "The quick brown fox", "-n", "12", *GREEDY)
    assert r.exit_code == 0, r.output
    assert r.stdout == greedy_text(llm, "The quick brown fox", 12) + "\n"


def test_stream_prints_the_same_text(tiny_moe, llm):
    r = run("generate", str(tiny_moe), "The quick brown fox", "-n", "12", "--stream", *GREEDY)
    assert r.exit_code == 0, r.output
    assert r.stdout == greedy_text(llm, "The quick brown fox", 12) + "\n"


def test_model_option_with_one_positional_prompt(tiny_moe, llm):
    r = run("generate", "--model", str(tiny_moe), "hello", "-n", "6", *GREEDY)
    assert r.exit_code == 0, r.output
    assert r.stdout == greedy_text(llm, "hello", 6) + "\n"


def test_prompt_from_stdin(tiny_moe, llm):
    r = run("generate", str(tiny_moe), "-", "-n", "6", *GREEDY, input="hello")
    assert r.exit_code == 0, r.output
    assert r.stdout == greedy_text(llm, "hello", 6) + "\n"


def test_sampling_flags_reach_the_sampler(tiny_moe, llm):
    flags = ["-n", "10", "--temperature", "1.3", "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01",
             "--repetition-penalty", "1.2", "--presence-penalty", "0.5", "--frequency-penalty", "0.3",
             "--seed", "7", "-q"]
    a = run("generate", str(tiny_moe), "hello", *flags)
    b = run("generate", str(tiny_moe), "hello", *flags, "--stream")
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    params = SamplingParams(max_tokens=10, temperature=1.3, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.3, seed=7)
    expected = llm.generate("hello", params)[0].outputs[0].text + "\n"
    assert a.stdout == expected and b.stdout == expected  # same seed, same text, streamed or not
    c = run("generate", str(tiny_moe), "hello", *flags[:-3], "--seed", "8", "-q")
    assert c.exit_code == 0 and c.stdout != expected


def test_stop_strings_and_ignore_eos(tiny_moe, llm):
    full = llm.generate("hello", SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    r = run("generate", str(tiny_moe), "hello", "-n", "24", "--ignore-eos", *GREEDY)
    assert r.exit_code == 0
    assert r.stdout == full + "\n"
    stop = full[6:8]
    assert len(stop) == 2
    cut = full[: full.find(stop)]
    for extra in ([], ["--stream"]):
        r = run("generate", str(tiny_moe), "hello", "-n", "24", "--ignore-eos", "--stop", stop, "--stop", "\x00never",
                *GREEDY, *extra)
        assert r.exit_code == 0, r.output
        assert r.stdout == cut + "\n"


def test_generate_without_model_uses_the_embedded_model():
    assert os.path.isfile(default_model_path()), "the embedded model moeserve/data/moeserve-tiny-moe.gguf is missing"
    r = run("generate", "The for statement", "-n", "24", "--seed", "0", "-q")
    assert r.exit_code == 0, r.output
    text = r.stdout.strip()
    assert len(text) > 20
    letters = sum(ch.isascii() and (ch.isalpha() or ch.isspace()) for ch in text)
    assert letters / len(text) > 0.6, text  # English-like, not byte soup
    assert len([w for w in text.split() if w.isalpha()]) >= 3, text


# -- chat --------------------------------------------------------------------------------------


def chat_reply(llm: LLM, messages: list[dict], n: int) -> str:
    return llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=n, repetition_penalty=1.0))[0].outputs[0].text


def test_scripted_chat_session_with_clear_and_exit(tiny_moe, llm):
    script = "hello there\nand then?\n/clear\nhi again\n/exit\nthis line is never read\n"
    r = run("chat", str(tiny_moe), "-n", "8", *GREEDY, input=script)
    assert r.exit_code == 0, r.output
    one = chat_reply(llm, [{"role": "user", "content": "hello there"}], 8)
    two = chat_reply(llm, [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": one.strip()},
                           {"role": "user", "content": "and then?"}], 8)  # the history is kept...
    three = chat_reply(llm, [{"role": "user", "content": "hi again"}], 8)  # ...until /clear
    assert r.stdout == f"{one}\n{two}\n{three}\n"
    assert "(conversation cleared)" in r.stderr
    assert "never" not in r.stdout


def test_chat_ends_at_end_of_input_and_uses_system_prompt(tiny_moe, llm):
    r = run("chat", "--model", str(tiny_moe), "--system", "Be brief.", "-n", "8", *GREEDY, input="hello\n\n")
    assert r.exit_code == 0, r.output
    expected = chat_reply(llm, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], 8)
    assert r.stdout == expected + "\n"


def test_chat_and_serve_take_a_chat_template(tiny_moe, tmp_path, monkeypatch):
    import moeserve.server.app as server_app

    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    f = tmp_path / "t.jinja"
    f.write_text(template)
    mine = LLM(str(tiny_moe), warmup=False, chat_template=template)
    r = run("chat", str(tiny_moe), "-n", "6", *GREEDY, "--chat-template", str(f), input="hello\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == chat_reply(mine, [{"role": "user", "content": "hello"}], 6) + "\n"
    calls = []
    monkeypatch.setattr(server_app, "run", lambda *a, **k: calls.append(k))
    assert run("serve", str(tiny_moe), "--chat-template", str(f)).exit_code == 0
    assert calls[-1]["chat_template"] == template  # the file is read once, before the server starts
    r = runner.invoke(app, ["serve", str(tiny_moe)], env={"MOESERVE_CHAT_TEMPLATE": template})
    assert r.exit_code == 0 and calls[-1]["chat_template"] == template
    r = run("serve", str(tiny_moe), "--chat-template", str(tmp_path / "missing.jinja"))
    assert r.exit_code == 1 and "no such file" in r.stderr and len(calls) == 2
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_drops_old_turns_when_the_context_is_full(tiny_moe):
    lines = "".join(f"message number {i} with a few more words in it\n" for i in range(12))
    r = run("chat", str(tiny_moe), "-n", "8", "--max-model-len", "160", *GREEDY, input=lines)
    assert r.exit_code == 0, r.output
    assert "oldest message" in r.stderr
    assert len(r.stdout.split("\n")) >= 12


def test_chat_unknown_command_is_a_notice(tiny_moe):
    r = run("chat", str(tiny_moe), "-q", input="/frobnicate\n/help\n/exit\n")
    assert r.exit_code == 0
    assert r.stdout == ""
    assert "unknown command /frobnicate" in r.stderr and "/clear" in r.stderr


# -- inspect -----------------------------------------------------------------------------------


def test_inspect_shows_architecture_config_types_params_memory(tiny_moe):
    r = run("inspect", str(tiny_moe))
    assert r.exit_code == 0, r.output
    out = r.stdout
    for needle in ("qwen3moe", "layers", "experts per token", "expert ffn", "Tensor types", "F32", "parameters",
                   "active per token", "memory", "KV cache", "tokenizer", "qwen2"):
        assert needle in out, needle
    f = GGUFFile(tiny_moe)
    assert f"{f.n_params():,}" in out


def test_inspect_json_and_embedded_default():
    r = run("inspect", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    f = GGUFFile(default_model_path())
    assert d["architecture"] == "qwen3moe" and d["parameters"] == f.n_params()
    assert d["config"]["layers"] >= 4 and d["config"]["experts"] >= 8 and d["config"]["experts_per_token"] == 2
    assert "Q8_0" in d["tensor_types"] and d["license"] == "PSF-2.0"
    assert d["memory"]["weights_bytes"] == f.total_bytes()


# -- serve -------------------------------------------------------------------------------------


def test_serve_passes_options_to_the_server(tiny_moe, monkeypatch):
    import moeserve.server.app as server_app

    calls = []
    monkeypatch.setattr(server_app, "run", lambda *a, **k: calls.append((a, k)))
    r = run("serve", str(tiny_moe), "--host", "0.0.0.0", "--port", "9123", "--api-key", "sk-test",
            "--max-model-len", "512", "--max-num-seqs", "4")
    assert r.exit_code == 0, r.output
    (args, kwargs), = calls
    assert args == (str(tiny_moe),)
    assert kwargs["host"] == "0.0.0.0" and kwargs["port"] == 9123 and kwargs["api_key"] == "sk-test"
    assert kwargs["max_model_len"] == 512 and kwargs["max_num_seqs"] == 4 and "kernels" not in kwargs
    assert {"max_num_batched_tokens", "kv_cache_dtype", "enable_prefix_caching"}.isdisjoint(kwargs)  # defaults
    r = run("serve", "--port", "9124")  # no MODEL: the embedded one
    assert r.exit_code == 0 and calls[-1][0] == (default_model_path(),)
    r = run("serve", "--max-num-batched-tokens", "2048", "--kv-cache-dtype", "bfloat16", "--no-enable-prefix-caching")
    assert r.exit_code == 0, r.output
    kw = calls[-1][1]
    assert kw["max_num_batched_tokens"] == 2048 and kw["kv_cache_dtype"] == "bfloat16"
    assert kw["enable_prefix_caching"] is False
    assert run("serve", "--seed", "7").exit_code == 0 and calls[-1][1]["seed"] == 7
    r = run("serve", "--kv-cache-dtype", "int8")
    assert r.exit_code == 1 and "kv_cache_dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got 'int8'" \
        in r.output and "Traceback" not in r.output
    assert run("serve", "--max-num-batched-tokens", "0").exit_code == 2 and len(calls) == 4


# -- errors: one line, exit code != 0, no traceback ----------------------------------------------


@pytest.mark.parametrize("argv, code", [
    (["generate", "/no/such/model.gguf", "hi"], 1),
    (["chat", "/no/such/model.gguf"], 1),
    (["inspect", "/no/such/model.gguf"], 1),
    (["serve", "/no/such/model.gguf"], 1),
    (["generate", "{model}", "hi", "--temperature", "-1"], 1),
    (["generate", "{model}", "hi", "--top-p", "1.5"], 1),
    (["generate", "{model}", "hi", "--max-tokens", "0"], 1),
    (["generate", "{model}", "hi", "--stop", ""], 1),
    (["generate", "{model}", "hi", "--kernels", "turbo"], 1),
    (["generate", "{model}"], 1),  # a model but no prompt
    (["generate", "{model}", "a", "b"], 1),  # three positionals
    (["generate", "--model", "{model}", "{model}", "hi"], 1),  # MODEL twice
    (["generate", "{model}", "hi", "--temperature", "abc"], 2),
    (["generate", "{model}", "hi", "--top-k"], 2),
    (["generate", "{model}", "hi", "--no-such-flag"], 2),
    (["serve", "{model}", "--port", "70000"], 2),
    (["nonsense"], 2),
])
def test_errors_are_one_line(tiny_moe, argv, code):
    r = run(*[a.replace("{model}", str(tiny_moe)) for a in argv])
    assert r.exit_code == code, r.output
    assert_one_line_error(r.stderr)
    assert r.stdout == ""


def test_not_a_gguf_is_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model" * 10)
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    for path in (bad, trunc):
        for argv in (["inspect", str(path)], ["generate", str(path), "hi"]):
            r = run(*argv)
            assert r.exit_code == 1, r.output
            assert_one_line_error(r.stderr)
            assert str(path) in r.stderr


def test_real_process_errors_have_no_traceback(tiny_moe):
    for argv, code in ((["generate", "/no/such.gguf", "hi"], 1),
                       (["generate", str(tiny_moe), "hi", "--temperature", "abc"], 2),
                       (["generate", str(tiny_moe), "hi", "--min-p", "7"], 1)):
        p = run_subprocess(*argv)
        assert p.returncode == code, p.stderr
        assert_one_line_error(p.stderr)


def test_real_process_generates(tiny_moe, llm):
    p = run_subprocess("generate", str(tiny_moe), "hello", "-n", "5", *GREEDY)
    assert p.returncode == 0, p.stderr
    assert p.stdout == greedy_text(llm, "hello", 5) + "\n"
    assert "Traceback" not in p.stderr


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("generate", "chat", "inspect", "serve"):
        assert cmd in r.stdout
    r = run()
    assert r.exit_code == 0 and "generate" in r.stdout
