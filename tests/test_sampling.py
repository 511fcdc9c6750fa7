"""Tests for moeserve.engine.sampling on hand-written logits with hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve.engine import sampling
from moeserve.engine.sampling import (
    Sampler,
    SamplingParams,
    StopChecker,
    apply_min_p,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
)
from moeserve.errors import RequestError

NEG_INF = float("-inf")


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    """A [1, V] logits row whose softmax is exactly `probs` (up to float rounding)."""
    return torch.tensor([probs]).log()


def _kept(logits: torch.Tensor) -> list[bool]:
    """Which entries of a single-row result survived the filter."""
    return torch.isfinite(logits[0]).tolist()


def _sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    prev: list[list[int]] | None = None,
    out: list[list[int]] | None = None,
) -> tuple[torch.Tensor, list]:
    b = logits.shape[0]
    return Sampler().sample(
        logits,
        params,
        generators if generators is not None else [None] * b,
        prev if prev is not None else [[] for _ in range(b)],
        out if out is not None else [[] for _ in range(b)],
    )


# ---------------------------------------------------------------------------- SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p) == (1, 1.0, -1, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.max_tokens == 16 and p.logprobs is None and p.seed is None and not p.ignore_eos
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy


def test_stop_normalised_to_list() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]
    assert SamplingParams(stop=None).stop == []


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"n": 0}, "n"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_validation_names_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(RequestError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    assert f"{name}=" in message
    assert repr(next(iter(kwargs.values()))) in message


def test_valid_edge_values_accepted() -> None:
    SamplingParams(top_k=0, top_p=1.0, min_p=1.0, max_tokens=None, logprobs=0, temperature=0)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, seed=0)


# ---------------------------------------------------------------------------- filters


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert _kept(out) == [False, True, False, True, False]
    assert out[0, 1] == 5.0 and out[0, 3] == 4.0  # survivors unchanged
    assert torch.equal(apply_top_k(logits, -1), logits)
    assert torch.equal(apply_top_k(logits, 0), logits)
    assert torch.equal(apply_top_k(logits, 99), logits)


def test_top_k_per_row_and_renormalised_distribution() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    out = apply_top_k(logits, [3, -1])
    assert _kept(out[:1]) == [False, True, True, True]
    assert torch.equal(out[1], logits[1])
    probs = torch.softmax(out[0], dim=-1)
    expected = torch.softmax(torch.tensor([5.0, 3.0, 4.0]), dim=-1)
    torch.testing.assert_close(probs[[1, 2, 3]], expected)
    assert probs[0] == 0.0


def test_top_k_keeps_ties_at_threshold() -> None:
    out = apply_top_k(torch.tensor([[3.0, 2.0, 2.0, 1.0]]), 2)
    assert _kept(out) == [True, True, True, False]


def test_top_p_smallest_nucleus() -> None:
    logits = _logits_from_probs([0.1, 0.5, 0.15, 0.25])
    # 0.5 alone < 0.6 -> need 0.25 too (0.75 >= 0.6)
    assert _kept(apply_top_p(logits, 0.6)) == [False, True, False, True]
    # 0.5 + 0.25 = 0.75 < 0.8 -> add 0.15
    assert _kept(apply_top_p(logits, 0.8)) == [False, True, True, True]
    # the top token alone already exceeds p
    assert _kept(apply_top_p(logits, 0.3)) == [False, True, False, False]
    assert torch.equal(apply_top_p(logits, 1.0), logits)
    probs = torch.softmax(apply_top_p(logits, 0.6), dim=-1)[0]
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]))


def test_top_p_after_top_k_uses_renormalised_mass() -> None:
    logits = _logits_from_probs([0.4, 0.3, 0.2, 0.1])
    # after top_k=2 the distribution is [4/7, 3/7]; p=0.5 -> only the first survives
    out = apply_top_p(apply_top_k(logits, 2), 0.5)
    assert _kept(out) == [True, False, False, False]


def test_top_p_candidates_give_the_full_sort_nucleus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The nucleus found among the NUCLEUS_CANDIDATES most likely tokens is the full sort's, for peaked rows
    (decided there), a flat row whose nucleus lies past the candidates (sorted whole), and p = 1 (unchanged)."""
    g = torch.Generator().manual_seed(0)
    V = 5000
    peaked = torch.randn(3, V, generator=g) * 6
    flat = torch.randn(1, V, generator=g) * 0.1
    logits = torch.cat([peaked, flat])
    p = [0.9, 0.5, 1.0, 0.9]
    fast = sampling.apply_top_p(logits, p)
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", V)  # every row decided by one full-width top-k
    assert torch.equal(fast, sampling.apply_top_p(logits, p))
    assert torch.equal(fast[2], logits[2])
    kept = (fast > float("-inf")).sum(1).tolist()
    assert kept[0] < 1024 and kept[3] > 1024  # both paths were taken
    rows = [0, 1, 3]  # and the same as sorting every row
    assert torch.equal(fast[rows], sampling._top_p_sorted(logits[rows], torch.tensor(p)[rows].reshape(-1, 1)))


def test_draw_matches_the_distribution_across_chunks() -> None:
    """Inverse-CDF sampling over 1024-token chunks: frequencies match, tokens of probability 0 (most of the
    vocabulary, and the ones beside chunk edges) are never drawn, whatever the vocabulary's length."""
    V = 3000  # not a multiple of the chunk
    hot = [0, 1023, 1024, 2047, 2999]
    probs = torch.zeros(2, V)
    probs[:, hot] = torch.tensor([0.1, 0.3, 0.2, 0.15, 0.25])
    n = 20000
    counts = torch.zeros(V)
    torch.manual_seed(0)
    for _ in range(n // 2):
        counts.index_add_(0, sampling.draw(probs, [None, None]), torch.ones(2))
    assert counts.nonzero().flatten().tolist() == hot
    torch.testing.assert_close(counts[hot] / n, probs[0, hot], atol=0.015, rtol=0)


def test_draw_seeded_rows_and_bad_rows() -> None:
    """A seeded row's draw depends on its generator alone; a row without a valid total (NaN) gets its first
    maximum rather than an error."""
    probs = torch.softmax(torch.randn(3, 2500, generator=torch.Generator().manual_seed(1)), -1)
    gens = [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(6)]
    a = sampling.draw(probs, gens)
    b = sampling.draw(probs, [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(6)])
    assert a[0] == b[0] and a[2] == b[2]
    bad = probs.clone()
    bad[1, 7] = float("nan")
    assert sampling.draw(bad, [None] * 3)[1] == 7


def test_min_p_relative_threshold() -> None:
    logits = _logits_from_probs([0.5, 0.3, 0.12, 0.08])
    # threshold = 0.2 * 0.5 = 0.1 -> 0.08 removed
    assert _kept(apply_min_p(logits, 0.2)) == [True, True, True, False]
    # threshold = 0.5 * 0.5 = 0.25 -> 0.12 and 0.08 removed
    out = apply_min_p(logits, 0.5)
    assert _kept(out) == [True, True, False, False]
    torch.testing.assert_close(
        torch.softmax(out, dim=-1)[0], torch.tensor([0.625, 0.375, 0.0, 0.0])
    )
    assert torch.equal(apply_min_p(logits, 0.0), logits)
    assert _kept(apply_min_p(logits, 1.0)) == [True, False, False, False]


def test_temperature_scales_and_leaves_greedy_rows() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    out = apply_temperature(logits, [0.5, 0.0])
    torch.testing.assert_close(out[0], torch.tensor([4.0, 2.0, 0.0]))
    torch.testing.assert_close(out[1], logits[1])
    hot = torch.softmax(apply_temperature(logits[:1], 2.0), dim=-1)[0]
    e = torch.tensor([1.0, 0.5, 0.0]).exp()
    torch.testing.assert_close(hot, e / e.sum())


def test_repetition_penalty_hf_style() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = apply_penalties(logits, [[0, 1, 1]], [[]], repetition_penalty=2.0)
    # positive seen logit divided, negative seen logit multiplied, unseen untouched
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    assert logits[0, 0] == 2.0  # input not modified


def test_frequency_and_presence_penalties_openai_style() -> None:
    logits = torch.zeros(1, 4)
    # prompt tokens (in prev only) must not be counted for frequency/presence
    prev = [[3, 3, 0, 0, 0, 1]]
    out_tokens = [[0, 0, 0, 1]]
    out = apply_penalties(logits, prev, out_tokens, frequency_penalty=0.5, presence_penalty=0.25)
    # token 0: 3 * 0.5 + 0.25; token 1: 1 * 0.5 + 0.25; token 2/3: not in output
    torch.testing.assert_close(out, torch.tensor([[-1.75, -0.75, 0.0, 0.0]]))


def test_penalties_per_row_and_order() -> None:
    logits = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    out = apply_penalties(
        logits,
        [[0], [0]],
        [[0], [0]],
        repetition_penalty=[2.0, 1.0],
        frequency_penalty=[1.0, 0.0],
        presence_penalty=[0.0, 1.0],
    )
    # row 0: repetition first (2 / 2 = 1), then frequency (1 - 1 = 0); row 1: presence only
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0], [1.0, 2.0]]))


def test_penalty_token_out_of_vocab_rejected() -> None:
    with pytest.raises(RequestError, match="token id 7"):
        apply_penalties(torch.zeros(1, 4), [[7]], [[]], repetition_penalty=1.5)


# ---------------------------------------------------------------------------- sampler


def test_greedy_is_argmax_and_ignores_generator() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    gen = make_generator(SamplingParams(seed=1))
    state = gen.get_state()
    ids, lps = _sample(
        logits, [SamplingParams(temperature=0.0), SamplingParams(top_k=1, seed=1)], [None, gen]
    )
    assert ids.tolist() == [1, 0]
    assert lps == [None, None]
    assert torch.equal(gen.get_state(), state)


def test_greedy_sees_penalties() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    ids, _ = _sample(logits, params, prev=[[0]], out=[[]])
    assert ids.tolist() == [1]  # 3/2 = 1.5 < 2


def test_filters_applied_in_sampler() -> None:
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]])).repeat(200, 1)
    params = [SamplingParams(top_k=2)] * 200
    ids, _ = _sample(logits, params)
    assert set(ids.tolist()) <= {0, 1} and len(set(ids.tolist())) == 2
    params = [SamplingParams(min_p=0.6)] * 200  # threshold 0.18 -> tokens 0..2
    ids, _ = _sample(logits, params)
    assert set(ids.tolist()) == {0, 1, 2}


def test_sampling_matches_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 4000
    gen = make_generator(SamplingParams(seed=123))
    params = SamplingParams(seed=123)
    counts = torch.zeros(3)
    for _ in range(n):
        ids, _ = _sample(probs.log().unsqueeze(0), [params], [gen])
        counts[ids[0]] += 1
    torch.testing.assert_close(counts / n, probs, atol=0.03, rtol=0)


def _draw(seed: int, steps: int = 20, batch_mates: int = 0) -> list[int]:
    """Sample `steps` tokens for one seeded request, optionally alongside unseeded rows."""
    torch.manual_seed(999)  # unseeded batch-mates use the global RNG
    row = torch.randn(1, 50, generator=torch.Generator().manual_seed(7))
    logits = torch.cat([torch.randn(batch_mates, 50), row])
    params = SamplingParams(seed=seed, temperature=1.0)
    gen = make_generator(params)
    others = [SamplingParams()] * batch_mates
    out = []
    for _ in range(steps):
        ids, _ = _sample(logits, [*others, params], [None] * batch_mates + [gen])
        out.append(int(ids[-1]))
    return out


def test_same_seed_same_tokens_different_seed_differs() -> None:
    assert make_generator(SamplingParams()) is None
    a = _draw(42)
    assert a == _draw(42)
    assert a != _draw(43)
    # reproducible whatever else is in the batch
    assert a == _draw(42, batch_mates=3)


def test_logprobs_from_raw_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    params = [SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=5.0)]
    # penalty turns argmax to token 2 (3/5 = 0.6 < 2), but logprobs use raw logits
    ids, lps = _sample(logits, params, prev=[[1]], out=[[1]])
    assert ids.tolist() == [2]
    ref = torch.log_softmax(logits[0], dim=-1)
    info = lps[0]
    assert info is not None
    assert info.token_id == 2 and info.rank == 2
    assert math.isclose(info.logprob, float(ref[2]), rel_tol=1e-6)
    assert [t for t, _ in info.top] == [1, 2]
    for (tok, lp), want in zip(info.top, [ref[1], ref[2]], strict=True):
        assert math.isclose(lp, float(want), rel_tol=1e-6), tok
    assert math.isclose(sum(math.exp(v) for v in ref.tolist()), 1.0, rel_tol=1e-6)


def test_logprobs_zero_and_mixed_batch() -> None:
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=5),  # more than V: clipped
    ]
    ids, lps = _sample(logits, params)
    assert ids.tolist() == [1, 0, 0]
    assert lps[0] is not None and lps[0].top == []
    assert math.isclose(lps[0].logprob, -math.log1p(math.exp(-1.0)), rel_tol=1e-6)
    assert lps[1] is None
    assert lps[2] is not None and len(lps[2].top) == 2
    assert math.isclose(lps[2].logprob, math.log(0.5), rel_tol=1e-6)


def test_mixed_batch_and_half_precision_input() -> None:
    logits = torch.tensor([[0.0, 10.0, 0.0], [9.0, 0.0, 0.0]], dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=0.8)]
    ids, _ = _sample(logits, params)
    assert ids.dtype == torch.long and ids.tolist() == [1, 0]


def test_sampler_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="generators"):
        Sampler().sample(torch.zeros(2, 3), [SamplingParams()] * 2, [None], [[], []], [[], []])


# ---------------------------------------------------------------------------- stop strings


def test_stop_inside_one_token() -> None:
    checker = StopChecker(["STOP"])
    stopped, text = checker.check("Hello wor")
    assert not stopped and text == "Hello wor"
    # one token's text contains the whole stop string with text on both sides
    stopped, text = checker.check("Hello wor" + "ldSTOPmore")
    assert stopped and text == "Hello world"


def test_stop_across_token_boundaries() -> None:
    checker = StopChecker.from_params(SamplingParams(stop=["\n\nUser:"]))
    pieces = ["Sure", ".\n", "\nUs", "er", ":", " next"]
    text = ""
    streamed = ""
    result: tuple[bool, str] = (False, "")
    for piece in pieces:
        text += piece
        result = checker.check(text, num_new_chars=len(piece))
        if result[0]:
            break
        n = checker.safe_len(text)
        assert n >= len(streamed)
        streamed = text[:n]
    assert result == (True, "Sure.")
    assert streamed == "Sure."  # the held-back "\n\nUs..." was never streamed


def test_earliest_stop_string_wins() -> None:
    checker = StopChecker(["world", "lo"])
    assert checker.check("hello world") == (True, "hel")


def test_safe_len_holds_back_prefix_of_stop() -> None:
    checker = StopChecker(["</s>", "abc"])
    assert checker.safe_len("hi there") == 8
    assert checker.safe_len("hi <") == 3
    assert checker.safe_len("hi </") == 3
    assert checker.safe_len("hi ab") == 3
    assert checker.safe_len("hi a") == 3
    assert checker.safe_len("hi </s> more") == 3  # never past a full stop string
    assert checker.safe_len("") == 0
    assert StopChecker([]).safe_len("anything <") == 10
    assert StopChecker([]).check("x</s>") == (False, "x</s>")


def test_safe_len_overlapping_prefix() -> None:
    # "aab" after "xaa": suffix "aa" is a prefix of the stop string, hold back both chars
    checker = StopChecker(["aab"])
    assert checker.safe_len("xaa") == 1
    assert checker.check("xaaab") == (True, "xa")


def test_incremental_check_matches_full_check() -> None:
    checker = StopChecker(["<|end|>", "###"])
    text = "abc<|e" + "nd|>tail"
    assert checker.check(text, num_new_chars=len("nd|>tail")) == checker.check(text)
    assert checker.check(text) == (True, "abc")


def test_llm_seed_makes_unseeded_requests_reproducible(tiny_moe) -> None:
    """vLLM's `LLM(seed=...)` / `--seed`: requests without a seed of their own draw from a seeded generator."""
    from moeserve import LLM
    from moeserve.engine.sampling import SamplingParams
    from moeserve.errors import RequestError

    params = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True)

    def texts(seed: int) -> list[list[int]]:
        llm = LLM(str(tiny_moe), warmup=False, seed=seed)
        return [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7]] * 3, params)]

    assert texts(11) == texts(11)
    assert texts(11) != texts(12)
    for bad in (-1, 2**63, 1.5, True, "7"):
        with pytest.raises(RequestError, match="seed must be a whole number"):
            LLM(str(tiny_moe), warmup=False, seed=bad)
