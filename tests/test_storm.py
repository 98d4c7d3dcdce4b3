"""The load-and-fault storm (tests/stress/storm.py): plan and checks, and a short real run.

The short run is one pair of real servers (without / with specstream, float32) under a KV
cache of a few sequences: a mixed storm at concurrency 24 (greedy, streamed, stop strings,
logprobs, seeded sampling, n=2, client aborts) with long answers that force preemption, plus the
max_model_len edges and the min_p / logit_bias requests vLLM refuses with speculation. Greedy answers must equal the no-speculation server's.
"""
from __future__ import annotations

import pytest

from tests.stress import storm
from tests.stress.storm_plan import (COMPLETIONS, GREEDY_KINDS, Outcome, Req, check, edge_plan,
                                   limits_plan, storm_plan)


def test_plan_is_deterministic_and_has_every_kind():
    plan = storm_plan(27, seed=3)
    assert [r.body for r in plan] == [r.body for r in storm_plan(27, seed=3)]
    assert {r.kind for r in plan} == {"greedy", "seeded", "greedy_stream", "n2", "stop", "abort",
                                      "logprobs"}
    assert all(r.body["temperature"] == 0 for r in plan if r.kind in GREEDY_KINDS)
    assert all(r.abort_after_chunks > 0 and r.body["stream"] for r in plan if r.kind == "abort")


def test_edge_plan_reaches_max_model_len_exactly():
    plan = {r.id: r.body for r in edge_plan([5, 6, 7], max_model_len=64, gamma=4)}
    fill = [b for k, b in plan.items() if k.startswith("edge-fill-")]
    assert fill and all(len(b["prompt"]) + b["max_tokens"] == 64 for b in fill)
    assert len(plan["edge-over-by-1"]["prompt"]) + plan["edge-over-by-1"]["max_tokens"] == 65
    assert len(plan["edge-prompt-at-len"]["prompt"]) == 64
    assert all(r.path == COMPLETIONS and r.body["ignore_eos"] for r in edge_plan([1], 64, 4))


def test_checks_catch_malformed_answers():
    n2 = Req("n2-1", "n2", "/v1/chat/completions", {"n": 2, "max_tokens": 8})
    assert check(n2, Outcome("n2-1", "n2", 200, ["a"], ["stop"], 3))
    assert not check(n2, Outcome("n2-1", "n2", 200, ["a", "b"], ["stop", "length"], 9))
    stop = Req("stop-1", "stop", "/v1/chat/completions", {"stop": ["."], "max_tokens": 8})
    assert check(stop, Outcome("stop-1", "stop", 200, ["Paris. Yes"], ["stop"], 4))
    lp = Req("lp", "logprobs", "/v1/chat/completions", {"max_tokens": 8})
    entry = {"token": "a", "logprob": -2.0, "top_logprobs": [{"logprob": -0.1}, {"logprob": -2.0},
                                                             {"logprob": -3.0}]}
    assert check(lp, Outcome("lp", "logprobs", 200, ["a"], ["length"], 1, {"content": [entry]}))
    assert check(lp, Outcome("lp", "logprobs", 200, ["a"], ["length"], 2, {"content": [entry]}))
    edge = Req("edge-x", "edge", COMPLETIONS, {})
    assert not check(edge, Outcome("edge-x", "edge", 400))
    assert check(edge, Outcome("edge-x", "edge", 500))


def test_compare_counts_wrong_greedy_only():
    plan = [Req("g", "greedy", "", {"max_tokens": 4}), Req("s", "seeded", "", {"max_tokens": 4})]
    base = [Outcome("g", "greedy", 200, ["x"], ["stop"], 1), Outcome("s", "seeded", 200, ["y"], ["stop"], 1)]
    spec = [Outcome("g", "greedy", 200, ["z"], ["stop"], 1), Outcome("s", "seeded", 200, ["w"], ["stop"], 1)]
    r = storm.compare(plan, base, spec)
    assert r["greedy_compared"] == 1 and [w["id"] for w in r["wrong_greedy"]] == ["g"]
    assert not r["failures"]
    refused = limits_plan()
    ok = [Outcome(q.id, q.kind, 200, ["x"], ["stop"], 1) for q in refused]
    assert len(storm.compare(refused, ok, ok)["failures"]) == 2  # speculation must answer 400
    assert not storm.compare(refused, ok, [Outcome(q.id, q.kind, 400) for q in refused])["failures"]


@pytest.mark.vllm
@pytest.mark.timeout(3600)
def test_short_storm_greedy_identical_no_failures(smollm2_dir, shipped_streams, tmp_path):
    if shipped_streams is None:
        pytest.skip("no shipped streams")
    model, max_len = str(smollm2_dir), 512
    plan = storm_plan(36, seed=7, max_tokens=(24, 96))
    # long answers that outgrow the cache: the scheduler must preempt and recompute
    plan += storm_plan(6, seed=8, max_tokens=(200, 300), ignore_eos=True,
                       kinds=["greedy", "seeded", "greedy_stream"], tag="long-")
    plan += edge_plan(storm.edge_token_ids(model), max_len, gamma=4) + limits_plan()
    report = storm.run_pair(model, str(shipped_streams), {"storm": (plan, 24)}, tmp_path, "short",
                            max_model_len=max_len, enforce_eager=True,
                            kv_cache_bytes=storm.kv_bytes_for_tokens(model, 3 * max_len))
    summary = storm.summarize(report)
    storm.print_report(report, summary)
    r = report["short/storm"]
    assert not r["wrong_greedy"], r["wrong_greedy"][:2]
    assert not r["failures"], r["failures"][:10]
    assert r["greedy_compared"] >= 26 and r["aborted"] > 0
    assert r["edges"]["edge-prompt-at-len"][0] == r["edges"]["edge-prompt-over-len"][0] == 400
    fill = {k: v for k, v in r["edges"].items() if k.startswith("edge-fill-")}
    assert fill and all(v == [200, int(k.rsplit("-", 1)[1]), ["length"]]
                        for k, v in fill.items()), r["edges"]
    assert r["counters"]["specstream"].get("vllm:spec_decode_num_drafts", 0) > 0
    assert summary["specstream_preemptions"] > 0, "the tiny KV cache did not force preemption"
