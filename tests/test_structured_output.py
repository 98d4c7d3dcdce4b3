"""Structured outputs (vLLM's ``StructuredOutputsParams``: JSON schema, regex, choice)
with specstream: the grammar masks the target's logits and cuts drafts it does not allow,
so greedy answers must equal vLLM's without speculation token for token and every
answer, greedy or sampled, must satisfy its constraint. Offline in two engines, then
through ``vllm serve``'s ``response_format`` (one server)."""
from __future__ import annotations

import json

import pytest

from tests.stat_sampling import run_engine
from tests.structured_job import CASES, CHOICES, PHONE, SCHEMA, valid

pytestmark = pytest.mark.vllm
SAMPLES = 8


@pytest.fixture(scope="module")
def runs(smollm2_dir, shipped_streams, tmp_path_factory):
    if shipped_streams is None:
        pytest.skip("no shipped stream checkpoint")
    tmp = tmp_path_factory.mktemp("structured")
    job = {"model": str(smollm2_dir), "samples": SAMPLES}
    base = run_engine(job, tmp, "base", module="tests.structured_job")
    spec = run_engine(dict(job, spec={"method": "specstream", "model": str(shipped_streams),
                                      "num_speculative_tokens": 4, "draft_policy": "fixed"},
                           env={"SPECSTREAM_MIN_DRAFT_PROB": "0"}),
                      tmp, "spec", module="tests.structured_job")
    sd = spec["spec_decode"]
    print(f"\nstructured outputs with specstream: {sd['drafts']} drafts, "
          f"{sd['accepted_tokens']}/{sd['draft_tokens']} draft tokens accepted, per position "
          f"{sd.get('accepted_per_pos')}")
    return base, spec


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_identical_and_valid(runs, case):
    base, spec = runs
    b, s = base["cases"][case]["greedy"], spec["cases"][case]["greedy"]
    assert valid(case, b["text"]), f"{case}: vLLM's own greedy answer is invalid: {b['text']!r}"
    assert s["tokens"] == b["tokens"], f"{case}: {s['text']!r} != {b['text']!r}"
    assert valid(case, s["text"]), f"{case}: invalid greedy answer {s['text']!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_always_valid(runs, case):
    _, spec = runs
    answers = spec["cases"][case]["sampled"]
    assert len(answers) == SAMPLES
    bad = [a for a in answers if not valid(case, a["text"])]
    assert not bad, f"{case}: {len(bad)} of {SAMPLES} sampled answers invalid: {bad[:3]}"


def test_drafts_were_verified_under_the_grammar(runs):
    sd = runs[1]["spec_decode"]
    assert sd["drafts"] > 0 and sd["accepted_tokens"] > 0, sd


# -- through the OpenAI server ------------------------------------------------------------

from tests.test_serve import server  # noqa: E402,F401  (the module's server fixture)


def _formats() -> dict:
    return {
        "json": {"response_format": {"type": "json_schema",
                                     "json_schema": {"name": "person", "schema": SCHEMA}}},
        "regex": {"extra_body": {"structured_outputs": {"regex": PHONE}}},
        "choice": {"extra_body": {"structured_outputs": {"choice": CHOICES}}},
    }


def test_serve_response_format_valid(server):  # noqa: F811
    import urllib.request

    from openai import OpenAI
    client = OpenAI(base_url=server + "/v1", api_key="unused")
    for case, kwargs in _formats().items():
        prompt = CASES[case][0]
        for temperature, seed in [(0.0, None), (1.0, 1), (1.0, 2)]:
            resp = client.chat.completions.create(
                model="smollm2", temperature=temperature, seed=seed, max_tokens=64,
                messages=[{"role": "user", "content": prompt}], **kwargs)
            text = resp.choices[0].message.content
            assert valid(case, text), f"{case} at temperature {temperature}: {text!r}"
    metrics = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    counts = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_") and "_total" in line}
    print("\nserver spec-decode counters after structured requests:", json.dumps(counts))
