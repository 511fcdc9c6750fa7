"""llama.cpp / vLLM flag conventions: each of -t/--threads, -c/--ctx-size, --temp, -f, -s/--seed means the same
in every command that has it; --version; a missing .gguf is an error, not a prompt; -c is validated against the
model's context length; statistics go to stderr also when it is not a terminal; serve reads MOESERVE_* variables."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import typer
from typer.testing import CliRunner

from moeserve import LLM, SamplingParams, __version__
from moeserve.cli import app, default_threads

runner = CliRunner()
COMMANDS = ("generate", "chat", "serve", "bench")

# flag -> every name of the option it belongs to, wherever it appears
CONVENTIONS = {
    "-t": {"-t", "--threads"},
    "--threads": {"-t", "--threads"},
    "-c": {"-c", "--ctx-size", "--max-model-len"},
    "--ctx-size": {"-c", "--ctx-size", "--max-model-len"},
    "--max-model-len": {"-c", "--ctx-size", "--max-model-len"},
    "--temp": {"--temp", "--temperature"},
    "--temperature": {"--temp", "--temperature"},
    "-f": {"-f", "--file"},
    "-s": {"-s", "--seed"},
    "--seed": {"-s", "--seed"},
    "-m": {"-m", "--model"},
    "-n": None,  # generated tokens: --max-tokens (generate/chat), --n-gen (bench)
    "-q": {"-q", "--quiet"},
}
EXPECTED = {  # which commands must have each option
    "-t": COMMANDS, "-c": ("generate", "chat", "serve"), "--temp": ("generate", "chat"), "-f": ("generate",),
    "--seed": ("generate", "chat"),
}


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def options(command: str) -> dict[str, set[str]]:
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    out: dict[str, set[str]] = {}
    for p in cmd.params:
        names = set(p.opts) | set(p.secondary_opts)
        for n in names:
            out[n] = names
    return out


def test_each_flag_means_the_same_in_every_command():
    for command in COMMANDS:
        opts = options(command)
        for flag, names in CONVENTIONS.items():
            if flag in opts and names is not None:
                assert opts[flag] == names, (command, flag, opts[flag])
    for flag, commands in EXPECTED.items():
        for command in commands:
            assert flag in options(command), (command, flag)
    for command in ("generate", "chat"):
        assert "-s" in options(command) and "--stream" not in options(command).get("-s", set())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_the_conventional_flags(command):
    r = run(command, "--help")
    assert r.exit_code == 0, r.output
    text = r.stdout
    for flag, commands in EXPECTED.items():
        if command in commands:
            names = sorted(CONVENTIONS[flag], key=len)
            line = next((x for x in text.splitlines() if re.search(rf"(^|[\s,]){re.escape(names[-1])}\b", x)), None)
            assert line is not None, (command, flag, text)
            for n in names:
                assert n in line, (command, n, line)


def test_version():
    for argv in (["--version"], ["-V"]):
        r = run(*argv)
        assert r.exit_code == 0 and r.stdout.strip() == f"moeserve {__version__}"


def test_a_missing_gguf_is_an_error_not_a_prompt(tmp_path):
    missing = str(tmp_path / "model.gguf")
    for argv in (["generate", missing], ["generate", missing, "hi"], ["chat", missing], ["serve", missing],
                 ["bench", missing], ["generate", "-f", str(tmp_path / "prompt.txt"), "hi"]):
        r = run(*argv)
        assert r.exit_code == 1, (argv, r.output)
        assert r.stderr.startswith("moeserve: error: ") and "no such file" in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


def test_a_bad_device_is_one_line_naming_it(tiny_moe):
    cases = [("tpu", "expected cpu, cuda or cuda:N"), ("cuda:x", "expected cpu, cuda or cuda:N"),
             ("cpu:2", "expected cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        cases += [("cuda", "use --device cpu"), ("cuda:1", "use --device cpu")]
    else:
        cases.append((f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"))
    for device, needle in cases:
        for argv in (["generate", str(tiny_moe), "hi", "-n", "1"], ["bench", str(tiny_moe), "-p", "4", "-n", "1"]):
            r = run(*argv, "--device", device)
            assert r.exit_code == 1, (argv, device, r.output)
            assert r.stderr.startswith(f"moeserve: error: device '{device}': ") and needle in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr
    assert LLM(str(tiny_moe), device=" CPU", warmup=False).device == torch.device("cpu")


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("flag", ["-c", "--ctx-size", "--max-model-len"])
def test_ctx_size_is_validated(tiny_moe, command, flag):
    extra = ["hi"] if command == "generate" else []
    for value, needle in (("0", "must be > 0"), ("-5", "must be > 0"), ("100000", "larger than the model's")):
        r = run(command, str(tiny_moe), *extra, flag, value)
        assert r.exit_code == 1, (command, flag, value, r.output)
        assert r.stderr.startswith("moeserve: error: ") and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_real_runs_with_llama_cpp_flags(tmp_path):
    """The embedded model, -n 2: -f, -c, -t, --temp, -s/--seed give what the engine gives; stats on stderr."""
    llm = LLM(None, max_model_len=64)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The for statement")
    before = torch.get_num_threads()
    try:
        greedy = llm.generate("The for statement", SamplingParams(max_tokens=2, temperature=0.0))[0].outputs[0].text
        r = run("generate", "-f", str(prompt), "-n", "2", "-c", "64", "-t", "1", "--temp", "0")
        assert r.exit_code == 0, r.output
        assert r.stdout == greedy + "\n"
        assert torch.get_num_threads() == 1
        assert re.search(r"\[\d+ tokens in [\d.]+ s, [\d.]+ tokens/s, finish: \w+\]", r.stderr), r.stderr
        r = run("generate", "The for statement", "-n", "2", "--ctx-size", "64", "--threads", "2", "--temperature",
                "0", "-q")
        assert r.exit_code == 0 and r.stdout == greedy + "\n" and r.stderr == ""
        assert torch.get_num_threads() == 2
        seeded = [run("generate", "The for statement", "-n", "2", "--temp", "1.5", flag, "11", "-q").stdout
                  for flag in ("-s", "--seed")]
        expected = llm.generate("The for statement", SamplingParams(max_tokens=2, temperature=1.5, seed=11,
                                                                     top_k=40, top_p=0.95, min_p=0.05,
                                                                     repetition_penalty=1.1))[0].outputs[0].text
        assert seeded == [expected + "\n"] * 2
        r = run("chat", "-n", "2", "-c", "64", "-t", "1", "--temp", "0", "-s", "1", "-q", input="hello\n")
        assert r.exit_code == 0, r.output
        assert len(r.stdout) > 0
    finally:
        torch.set_num_threads(before)


def test_threads_default_is_the_usable_cores(monkeypatch):
    import moeserve.bench as bench_mod

    seen = []

    class Result:
        def to_dict(self):
            return {"ok": True}

    monkeypatch.setattr(bench_mod, "run_bench", lambda *a, **k: seen.append(k["threads"]) or Result())
    assert run("bench", "--json", "-p", "1", "-n", "1").exit_code == 0
    assert run("bench", "--json", "-p", "1", "-n", "1", "-t", "3").exit_code == 0
    assert seen == [default_threads(), 3]
    assert default_threads() == len(os.sched_getaffinity(0))
    assert run("bench", "-t", "0").exit_code == 2


def test_serve_reads_environment_variables(tiny_moe, monkeypatch):
    import moeserve.server.app as server_app

    calls = []
    monkeypatch.setattr(server_app, "run", lambda *a, **k: calls.append((a, k)))
    before = torch.get_num_threads()
    env = {"MOESERVE_HOST": "0.0.0.0", "MOESERVE_PORT": "9555", "MOESERVE_API_KEY": "sk-env",
           "MOESERVE_MAX_NUM_SEQS": "3", "MOESERVE_MAX_MODEL_LEN": "128", "MOESERVE_SERVED_MODEL_NAME": "env-model",
           "MOESERVE_KV_CACHE_MEMORY": "64MiB", "MOESERVE_LOG_LEVEL": "warning", "MOESERVE_THREADS": "1",
           "MOESERVE_ALLOWED_ORIGINS": "http://a.example http://b.example"}
    try:
        r = runner.invoke(app, ["serve", str(tiny_moe)], env=env)
        assert r.exit_code == 0, r.output
        (args, kw), = calls
        assert (kw["host"], kw["port"], kw["api_key"], kw["max_num_seqs"], kw["max_model_len"]) == (
            "0.0.0.0", 9555, "sk-env", 3, 128)
        assert kw["served_model_name"] == "env-model" and kw["kv_cache_memory"] == "64MiB"
        assert kw["log_level"] == "warning" and torch.get_num_threads() == 1
        assert kw["allowed_origins"] == ["http://a.example", "http://b.example"]
        # flags win over the environment
        r = runner.invoke(app, ["serve", str(tiny_moe), "--port", "9556", "--allowed-origins", "*", "-c", "64"],
                          env=env)
        assert r.exit_code == 0, r.output
        kw = calls[-1][1]
        assert kw["port"] == 9556 and kw["allowed_origins"] == ["*"] and kw["max_model_len"] == 64
    finally:
        torch.set_num_threads(before)


def test_generate_help_and_json_unchanged_for_inspect(tiny_moe):
    r = run("inspect", str(tiny_moe), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["architecture"] == "qwen3moe"
