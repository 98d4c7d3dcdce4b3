"""Sampled continuations keep their distribution under speculation (specstream and, as a
control, vLLM's ngram), and a wrong acceptance rule is caught.

Three engines (none, specstream, ngram) draw ``SAMPLES`` continuations of ``NEW_TOKENS``
tokens for each of 2 prompts under 2 settings (temperature 1.0; temperature 0.8 with
top-k 20 and top-p 0.9); the token at every position is compared with the engine without
speculation by a two-sample chi-square test (tokens seen fewer than 10 times pooled).

False-alarm rate: Bonferroni over the 16 tests of a method (2 prompts x 2 settings x 4
positions), family-wise ``ALPHA`` = 1e-3 per method, so this file fails by chance less than
once in 500 runs.

Power: in the specstream engine a planted rule accepts every draft (``stat_sampling.
plant_accept_all``, a monkeypatch of vLLM's rejection sampler in that engine's process,
applied after its honest samples); with half the samples it is rejected with
p < 1e-6, and the power computed from the measured distributions (noncentral chi-square)
is printed and asserted above 0.95 (measured with 60 honest and 50 planted samples: p 1.5e-8,
power 0.94; both grow with the sample size; at the sizes below, above 0.99 on an AMD EPYC
and 0.976 on an Intel Xeon with AMX). The honest specstream and ngram engines must also have
drafted and had part of their drafts rejected, or the test would prove nothing.

``python -m tests.stat_sampling --samples 5000`` runs the same comparison larger.
"""
from __future__ import annotations

import pytest

from tests.stat_sampling import run_all, summary

SAMPLES = 160
NEW_TOKENS = 4
ALPHA = 1e-3


def test_two_sample_test_false_alarm_rate_and_power():
    """The statistic alone (no engine): at the nominal 1% level, samples of one Zipf-like
    distribution are rejected about 1% of the time or less, and a shift of 10% of the mass
    from the top token to the others is seen nearly always at 2,000 samples."""
    import random

    from tests.stat_sampling import two_sample_chi2
    rng = random.Random(0)
    tokens = list(range(30))
    w = [1 / (i + 1) for i in tokens]
    shifted = [w[0] - 0.1 * sum(w)] + [x + 0.1 * sum(w) / 29 for x in w[1:]]
    runs = 400
    alarms = sum(two_sample_chi2(rng.choices(tokens, w, k=SAMPLES),
                                 rng.choices(tokens, w, k=SAMPLES))[2] < 0.01 for _ in range(runs))
    assert alarms / runs <= 0.02, f"false-alarm rate {alarms / runs:.3f} at nominal 0.01"
    hits = sum(two_sample_chi2(rng.choices(tokens, w, k=2000),
                               rng.choices(tokens, shifted, k=2000))[2] < 0.01 for _ in range(50))
    assert hits >= 45, f"power {hits / 50:.2f} against a 10% shift at 2,000 samples"


@pytest.fixture(scope="module")
def report(smollm2_dir, shipped_streams, tmp_path_factory):
    if shipped_streams is None:
        pytest.skip("no shipped stream checkpoint")
    rep = run_all(str(smollm2_dir), str(shipped_streams), SAMPLES, NEW_TOKENS,
                  tmp_path_factory.mktemp("stat"), ALPHA)
    print("\n" + summary(rep))
    return rep


def _drafted_and_rejected(rep: dict) -> None:
    sd = rep["spec_decode"]
    assert sd["drafts"] > 0 and sd["draft_tokens"] > 0, f"no drafts were verified: {sd}"
    assert 0 < sd["accepted_tokens"] < sd["draft_tokens"], (
        f"every draft accepted or none ({sd}): the rejection path was not exercised")


@pytest.mark.vllm
@pytest.mark.parametrize("method", ["specstream", "ngram"])
def test_sampled_distribution_unchanged(report, method):
    rep = report[method]
    _drafted_and_rejected(rep)
    assert len(rep["tests"]) == 2 * 2 * NEW_TOKENS
    assert not rep["rejected"], (
        f"{method} changes the sampled distribution at {rep['rejected']} "
        f"(threshold p < {rep['alpha_per_test']:.2g})")


@pytest.mark.vllm
def test_planted_accept_all_rule_is_caught(report):
    rep = report["planted"]
    assert rep["rejected"], "the planted accept-every-draft rule went unnoticed"
    assert rep["min_p"] < 1e-6
    assert report["planted_power"] > 0.95
