"""A short soak in the suite: after a burst of mixed requests (greedy and sampled, short
and long, structured, some aborted mid-decode), the drafter's per-request structures are
back to their idle size and the ones keyed by batch size stay within the batch limit.

One engine (specstream, default draft policy and match source) logs its structure sizes
(``SPECSTREAM_STATE_LOG``, state_sizes.py); a lone request before the burst gives the idle
sizes, a lone request after it must log the same. ``tests/stress/soak.py`` is the long
version through a server."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.stat_sampling import run_engine

pytestmark = pytest.mark.vllm
MAX_SEQS = 8
BURST = 40
#: structures with one entry per live request (idle: the lone request's, at most 1)
PER_REQUEST = ("proposer._pending", "proposer.last_sources", "match._fed", "match.cache.active_requests",
               "runner.requests", "runner._specstream_sources", "policy.turnover._ids",
               "policy.turnover._open")
#: the suffix cache keeps finished responses as peers, up to its configured count
PEER_CACHE = "match.cache.cached_requests"


def run_job(job: dict) -> dict:
    import random

    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from specstream_vllm.vllm_integration.state_sizes import read_log
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
              speculative_config=job["spec"], max_num_seqs=MAX_SEQS)
    eng = llm.llm_engine
    log = Path(job["log"])
    rng = random.Random(0)

    def drain(abort_after: dict[str, int]) -> int:
        steps = aborted = 0
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
            due = [r for r, s in abort_after.items() if s == steps]
            if due:
                eng.abort_request(due)
                aborted += len(due)
        return aborted

    def lone(tag: str) -> dict:
        # long enough for a snapshot well inside it: snapshots come every 10 steps, and one
        # taken at its first step still holds the burst's last step (dropped one step later);
        # 160 tokens take at least 32 steps at 4 drafts a step
        eng.add_request(tag, "Count from one to thirty in words.",
                        SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True))
        drain({})
        return read_log(log)[-1]

    before = lone("idle-before")
    abort_after = {}
    prompts = ["Tell me about the sea.", "Write a poem about bread.", "What is 17 times 3?",
               "List five fruits.", "Explain recursion to a child."]
    for i in range(BURST):
        kind = i % 5
        rid = f"burst-{i}"
        if kind == 0:
            params = SamplingParams(temperature=0.0, max_tokens=rng.choice([8, 64]))
        elif kind in (1, 2):
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=i,
                                    max_tokens=rng.choice([16, 128]))
        elif kind == 3:
            params = SamplingParams(temperature=0.0, max_tokens=48,
                                    structured_outputs=StructuredOutputsParams(
                                        json={"type": "object", "properties": {
                                            "n": {"type": "integer"}}, "required": ["n"]}))
        else:                               # aborted after a few engine steps
            params = SamplingParams(temperature=0.7, max_tokens=200, ignore_eos=True)
            abort_after[rid] = rng.randint(3, 12)
        eng.add_request(rid, prompts[i % len(prompts)], params)
    aborted = drain(abort_after)
    after = lone("idle-after")
    return {"before": before["sizes"], "after": after["sizes"], "aborted": aborted,
            "snapshots": len(read_log(log)),
            "peak": {k: max(s["sizes"].get(k, 0) for s in read_log(log)) for k in after["sizes"]}}


@pytest.fixture(scope="module")
def result(smollm2_dir, shipped_streams, tmp_path_factory):
    if shipped_streams is None:
        pytest.skip("no shipped stream checkpoint")
    tmp = tmp_path_factory.mktemp("soak_short")
    log = tmp / "state.jsonl"
    job = {"model": str(smollm2_dir), "log": str(log),
           "spec": {"method": "specstream", "model": str(shipped_streams),
                    "num_speculative_tokens": 4},
           "env": {"SPECSTREAM_STATE_LOG": str(log)}}
    res = run_engine(job, tmp, "soak", module="tests.test_soak_short")
    print("\nstructure sizes idle before / peak / idle after the burst:")
    for k in sorted(res["after"]):
        print(f"  {k}: {res['before'].get(k)} / {res['peak'].get(k)} / {res['after'][k]}")
    return res


def test_burst_ran_with_aborts(result):
    assert result["aborted"] == BURST // 5
    assert result["snapshots"] > 5


def test_per_request_structures_back_to_idle(result):
    after, peak = result["after"], result["peak"]
    measured = [k for k in PER_REQUEST if k in after]
    assert "match._fed" in measured and "proposer._pending" in measured, sorted(after)
    assert any(peak[k] > 1 for k in measured), "the burst never had concurrent requests"
    grown = {k: after[k] for k in measured if after[k] > 1}
    assert not grown, f"per-request structures hold finished or aborted requests: {grown}"


def test_no_structure_grows_past_its_bound(result):
    before, after = result["before"], result["after"]
    # keyed by batch size: at most one entry per batch size the engine can form
    bound = {k: max(before.get(k, 0), MAX_SEQS + 1) for k in after}
    bound[PEER_CACHE] = BURST + 2   # every finished request, aborted ones too, is a peer
    grown = {k: (before.get(k), v) for k, v in after.items() if v > bound[k]}
    assert not grown, f"structures larger after the burst than their bound: {grown}"


if __name__ == "__main__":
    job = json.loads(Path(sys.argv[2]).read_text())
    Path(sys.argv[3]).write_text(json.dumps(run_job(job)))
