"""The draft policy inside real vLLM engines (SmolLM2-135M, float32, no mocks).

One engine per configuration, each in its own process: no speculation; ``auto`` (the
default) at batch 1, 8 and 32; ``auto`` with a forced verification cost; ``auto`` with
speculation forced off for its first steps. Greedy output must stay token-identical to
no speculation in all of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_vllm_integration import MAX_TOKENS, PROMPTS, run_engine, streams_for_smollm2

pytestmark = pytest.mark.vllm

BIG = 32
# SmolLM2 answers the first with "1. 1\n2. 2\n...", which trained streams draft well (the
# policy tests' batch-1 phases); the second with one run of digits ("123456789012..."), the
# stretch in which speculation is forced off
COUNTING = ["List the numbers from 1 to 30, one per line.",
            "Count from 1 to 40, separated by commas."]
VARIANTS = [f"{p} Please answer in a different way than usual (variant {i})."
            for i in range(4) for p in PROMPTS]                        # 32
ALL = COUNTING + PROMPTS + VARIANTS
N0, N1 = len(COUNTING), len(COUNTING) + len(PROMPTS)
LENGTHS = [64, 128] + MAX_TOKENS + [24] * len(VARIANTS)
# every answer runs to its max_tokens (ignore_eos): the batch-32 phase is 24 steps at 32
BATCHES = [[0], [1], [0], [N0], [N0 + 1], list(range(N0, N1)), list(range(N1, N1 + BIG))]
# batch 0 (64 tokens) drafts before step 40 and ends between step ~25 (good drafts) and 65
# (none); batch 1 (128 tokens) then spends most of its steps inside the window whichever it
# is, and batch 2 drafts again after it
OFF_FROM, OFF_STEPS = 40, 120


def steps(metrics: dict) -> tuple[int, int, int]:
    """(decode steps, steps without drafts, draft tokens) from vLLM's counters."""
    return (int(metrics.get("vllm:spec_decode_specstream_steps", 0)),
            int(metrics.get("vllm:spec_decode_specstream_steps_without_drafts", 0)),
            int(metrics.get("vllm:spec_decode_num_draft_tokens", 0)))


def phase(result: dict, i: int) -> tuple[int, int, int]:
    """The counters' increase during batch i."""
    after = steps(result["batches"][i]["metrics"])
    before = steps(result["batches"][i - 1]["metrics"]) if i else (0, 0, 0)
    return tuple(a - b for a, b in zip(after, before))


def acceptance(m: dict) -> float:
    return m["vllm:spec_decode_num_accepted_tokens"] / max(m["vllm:spec_decode_num_draft_tokens"], 1)


@pytest.fixture(scope="module")
def policy_runs(smollm2_dir, shipped_streams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy")
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp)
    job = {"model": str(smollm2_dir), "prompts": ALL, "max_tokens": LENGTHS, "batches": BATCHES,
           "max_num_seqs": BIG, "ignore_eos": True}
    # the streams' policy alone (the match source has its own tests: test_match_source.py)
    spec = {"method": "specstream", "model": str(streams), "num_speculative_tokens": 4,
            "match": "none"}
    runs = {"base": run_engine(job, tmp, "base")}
    for name, extra_spec, env in (
            ("auto", {"draft_policy": "auto"}, {}),
            ("costly", {}, {"SPECSTREAM_POLICY_COST_SCALE": "1000"}),
            ("cheap_off", {}, {"SPECSTREAM_POLICY_COST_SCALE": "0.01",
                               "SPECSTREAM_POLICY_FORCE_OFF_STEPS": f"{OFF_FROM}:{OFF_STEPS}"})):
        dump = tmp / f"{name}-policy.json"
        res = run_engine(dict(job, spec=dict(spec, **extra_spec),
                              env=dict(env, SPECSTREAM_POLICY_DUMP=str(dump))), tmp, name)
        res["policy"] = json.loads(dump.read_text())
        runs[name] = res
    return runs


@pytest.mark.parametrize("name", ["auto", "costly", "cheap_off"])
def test_greedy_float32_token_identical_batch1_and_batch8(policy_runs, name):
    base, spec = policy_runs["base"], policy_runs[name]
    for b0, b1 in zip(base["batches"], spec["batches"]):
        assert b0["outputs"] == b1["outputs"], f"{name}: batch {b0['indices'][:8]} differs"


def test_speculation_off_where_it_cannot_pay(policy_runs):
    """Batch 32, real measured costs: the step is compute-bound and the streams'
    acceptance cannot pay for the extra tokens and the draft pass."""
    res = policy_runs["auto"]
    s32, off32, d32 = phase(res, len(BATCHES) - 1)
    assert s32 > 0 and off32 / s32 > 0.6, f"batch 32: only {off32}/{s32} steps without drafts"
    pol = res["policy"]
    assert pol["mode"] == "auto" and pol["verify_cost_s"]["per_token"] > 0
    assert pol["skipped_passes"] > 0            # the stream pass itself was skipped
    # the steps that drafted were checked against the steps without drafts (the runner's
    # step records paired with their outputs: policy/guard.py)
    assert sum(r["steps"] for r in pol["realized"]) > 0, pol["realized"]


def test_speculation_on_where_it_pays(policy_runs):
    """Verification of drafts made (nearly) free: at batch 1 the streams' drafts pay for
    the draft pass and the policy drafts on most steps. (At batch 8 the eager float32
    draft pass alone, ~30 ms against an ~80 ms step, still outweighs the shipped streams'
    acceptance: there it stays off, correctly.)"""
    res = policy_runs["cheap_off"]
    s, off, drafts = phase(res, 0)
    assert drafts > 0 and off / s < 0.5, f"batch 1: {off}/{s} steps without drafts"
    assert res["policy"]["calibration"][0]["n"] > 0


def test_forced_high_cost_turns_speculation_off(policy_runs):
    res = policy_runs["costly"]
    n, off, drafts = steps(res["metrics"])
    assert n > 0 and off / n > 0.8, f"{off}/{n} steps without drafts"
    assert res["policy"]["skipped_passes"] > 0.7 * n   # the stream pass itself is skipped


def acceptance_in(res: dict, i: int) -> float:
    m1 = res["batches"][i]["metrics"]
    m0 = res["batches"][i - 1]["metrics"] if i else {}
    acc = m1["vllm:spec_decode_num_accepted_tokens"] - m0.get("vllm:spec_decode_num_accepted_tokens", 0)
    dr = m1["vllm:spec_decode_num_draft_tokens"] - m0.get("vllm:spec_decode_num_draft_tokens", 0)
    return acc / max(dr, 1)


def test_acceptance_does_not_collapse_after_speculation_off(policy_runs):
    """The same prompt before and after a stretch of steps without speculation: drafts
    come back with the acceptance they had (KV cache, hidden states and the policy's
    statistics intact)."""
    res = policy_runs["cheap_off"]
    assert res["policy"]["steps_without_speculation"] >= OFF_STEPS
    s1, off1, _ = phase(res, 1)
    assert off1 >= 0.6 * s1                              # the stretch without speculation
    before, after = acceptance_in(res, 0), acceptance_in(res, 2)
    assert phase(res, 2)[2] > 0
    assert after >= 0.7 * before, (before, after)
