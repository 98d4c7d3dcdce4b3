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
# predictable answers: the streams are right often enough for drafts to pay at batch 1
COUNTING = ["Count from 1 to 40, separated by commas.",
            "List the numbers from 1 to 30, one per line."]
VARIANTS = [f"{p} Please answer in a different way than usual (variant {i})."
            for i in range(3) for p in PROMPTS]
ALL = COUNTING + PROMPTS + VARIANTS                                    # 2 + 32 prompts
LENGTHS = [64, 64] + MAX_TOKENS + [24] * len(VARIANTS)
N0 = len(COUNTING)
BATCHES = [[0], [1], [N0], [N0 + 1], list(range(N0, N0 + 8)), list(range(N0, N0 + BIG))]


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
           "max_num_seqs": BIG}
    spec = {"method": "specstream", "model": str(streams), "num_speculative_tokens": 4}
    runs = {"base": run_engine(job, tmp, "base")}
    for name, extra_spec, env in (
            ("auto", {"draft_policy": "auto"}, {}),
            ("costly", {}, {"SPECSTREAM_POLICY_COST_SCALE": "1000"}),
            ("off_first", {}, {"SPECSTREAM_POLICY_FORCE_OFF_STEPS": "60"})):
        dump = tmp / f"{name}-policy.json"
        res = run_engine(dict(job, spec=dict(spec, **extra_spec),
                              env=dict(env, SPECSTREAM_POLICY_DUMP=str(dump))), tmp, name)
        res["policy"] = json.loads(dump.read_text())
        runs[name] = res
    return runs


@pytest.mark.parametrize("name", ["auto", "costly", "off_first"])
def test_greedy_float32_token_identical_batch1_and_batch8(policy_runs, name):
    base, spec = policy_runs["base"], policy_runs[name]
    for b0, b1 in zip(base["batches"], spec["batches"]):
        assert b0["outputs"] == b1["outputs"], f"{name}: batch {b0['indices'][:8]} differs"


def test_speculation_on_where_it_pays_off_where_it_cannot(policy_runs):
    """Batch 1 on predictable text: verifying one more token costs little and the streams
    are often right, drafts pay; batch 32: the step is compute-bound, the streams'
    acceptance cannot pay for the extra tokens and the draft pass."""
    res = policy_runs["auto"]
    single = [phase(res, i) for i in range(2)]                      # the counting prompts
    s1, off1, d1 = (sum(x[k] for x in single) for k in range(3))
    s32, off32, d32 = phase(res, len(BATCHES) - 1)
    assert s1 > 0 and d1 > 0, single
    assert off1 / s1 < 0.5, f"batch 1: {off1}/{s1} steps without drafts"
    assert off32 / s32 > 0.6, f"batch 32: only {off32}/{s32} steps without drafts"
    assert d32 / (BIG * s32) < 0.5 * d1 / s1   # draft tokens per request-step
    pol = res["policy"]
    assert pol["mode"] == "auto" and pol["verify_cost_s"]["per_token"] > 0
    assert pol["calibration"][0]["n"] > 0


def test_forced_high_cost_turns_speculation_off(policy_runs):
    res = policy_runs["costly"]
    n, off, drafts = steps(res["metrics"])
    assert n > 0 and off / n > 0.8, f"{off}/{n} steps without drafts"
    assert res["policy"]["skipped_passes"] > 0.7 * n   # the stream pass itself is skipped


def test_acceptance_does_not_collapse_after_speculation_off(policy_runs):
    """60 steps without speculation, then the policy drafts again with the acceptance it
    had: the stream inputs (KV cache, hidden states) and its statistics are intact."""
    res, ref = policy_runs["off_first"], policy_runs["auto"]
    assert res["policy"]["steps_without_speculation"] >= 60
    after = res["batches"][-1]["metrics"]
    assert after["vllm:spec_decode_num_draft_tokens"] > 0
    assert acceptance(after) >= 0.7 * acceptance(ref["metrics"]), (acceptance(after),
                                                                     acceptance(ref["metrics"]))
