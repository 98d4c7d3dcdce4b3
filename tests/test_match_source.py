"""The match source beside the streams: drafts from the request's own text.

Unit tests (no engine): the suffix and n-gram sources on a fake batch (drafts, state of
finished / preempted / reused requests), the draft policy's choice between a matched
draft and the streams' draft, the config key, and the per-source field of vLLM's stats
through vLLM's own msgpack encoding. One real engine pair (SmolLM2, shipped streams,
float32 greedy): a prompt with text to repeat gets matched drafts, a prompt without gets
stream drafts, outputs equal vLLM without speculation at batch 1 and 8, counters filled.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specstream_vllm.policy import STREAMS, Candidates, DraftPolicy, PolicyConfig
from specstream_vllm.vllm_integration.match_source import (NgramMatch, SuffixMatch, TokenView,
                                                           confidence, make_match_source)


def view(rows: dict[str, tuple[list[int], list[int]]], max_model_len: int = 256) -> TokenView:
    """A fake persistent batch: req_id -> (prompt, output so far)."""
    tok = np.zeros((max(len(rows), 1), max_model_len), dtype=np.int32)
    n = np.zeros(max(len(rows), 1), dtype=np.int32)
    p = np.zeros(max(len(rows), 1), dtype=np.int32)
    for i, (prompt, out) in enumerate(rows.values()):
        seq = prompt + out
        tok[i, :len(seq)] = seq
        n[i], p[i] = len(seq), len(prompt)
    return TokenView(list(rows), tok, n, p, max_model_len)


LIST = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
PROMPT = [1, 2, 3] + LIST + [4, 5]          # "repeat this list: 11 .. 20"


# ------------------------------------------------------------------ match sources

def test_suffix_drafts_the_continuation_from_the_prompt():
    m = SuffixMatch(max_tree_depth=24)                     # vLLM's defaults: up to 1 x match
    v = view({"a": (PROMPT, [11, 12, 13])})
    m.sync(v)
    (d,) = m.propose(v, [0], max_tokens=6)
    assert d.token_ids == [14, 15, 16] and d.match_len == 3
    # L / (L + 1) x the tree's frequency (its first token also counts the context's own
    # occurrence of the pattern, which has no continuation yet)
    assert d.confidence[1:] == pytest.approx([0.75] * 2) and 0 < d.confidence[0] <= 0.75
    m = SuffixMatch(max_tree_depth=24, max_spec_factor=2.0)
    m.sync(v)
    assert m.propose(v, [0], max_tokens=6)[0].token_ids == [14, 15, 16, 17, 18, 19]


def test_suffix_no_match_on_new_text():
    m = SuffixMatch()
    v = view({"a": (PROMPT, [40, 41, 42])})
    m.sync(v)
    assert m.propose(v, [0], max_tokens=4) == [None]


def test_suffix_state_follows_the_batch_finished_preempted_reused():
    m = SuffixMatch()
    m.sync(view({"a": (PROMPT, [11]), "b": (PROMPT, [11, 12])}))
    assert set(m.cache.active_requests) == {"a", "b"}
    m.sync(view({"b": (PROMPT, [11, 12, 13])}))            # a finished or aborted
    assert set(m.cache.active_requests) == {"b"} and m.state()["stopped"] == 1
    m.sync(view({}))                                         # b preempted
    assert not m.cache.active_requests
    v = view({"b": (PROMPT, [11, 12, 13, 14])})              # b resumes: rebuilt from its tokens
    m.sync(v)
    assert m.propose(v, [0], 3)[0].token_ids == [15, 16, 17]
    v = view({"b": ([7, 8, 9], [1])})                        # the id reused for another prompt
    m.sync(v)
    assert m.state()["restarts"] == 1 and m.propose(v, [0], 3) == [None]


def test_departed_requests_leave_without_a_lookup():
    """The proposer drops departed requests every step; lookups may be paused meanwhile."""
    m = SuffixMatch()
    m.sync(view({"a": (PROMPT, [11]), "b": (PROMPT, [11, 12])}))
    m.drop_departed(["b", None])                             # a finished; an empty row
    assert set(m.cache.active_requests) == {"b"} and "a" in m.cache.cached_requests
    m.drop_departed([])
    assert not m.cache.active_requests and m.state()["stopped"] == 2


def test_suffix_prefill_and_max_model_len():
    m = SuffixMatch()
    v = view({"a": (PROMPT, [])})                            # prefill: nothing sampled yet
    m.sync(v)
    assert not m.cache.active_requests and m.propose(v, [0], 4) == [None]
    v = view({"a": (PROMPT, [11, 12, 13])}, max_model_len=len(PROMPT) + 5)
    m.sync(v)
    assert len(m.propose(v, [0], 8)[0].token_ids) == 1       # room for one more token only


_NGRAM_CHECK = """
import json, numpy as np
from specstream_vllm.vllm_integration import vllm_ops
from specstream_vllm.vllm_integration.match_source import NgramMatch, TokenView
from tests.test_match_source import PROMPT, view
m = NgramMatch(vllm_ops.ngram_kernel(), min_n=2, max_n=5)
hit = m.propose(view({"a": (PROMPT, [11, 12, 13])}), [0], max_tokens=4)[0]
miss = m.propose(view({"a": (PROMPT, [40, 41])}), [0], max_tokens=4)[0]
print(json.dumps([hit.token_ids, hit.match_len, hit.confidence, miss]))
"""


def test_ngram_uses_vllms_kernel_and_finds_the_match_length():
    """In a child process: importing vLLM's numba kernel here would leave numba objects in
    sys.modules that vLLM's kernel-override scan (triton_utils.dispatcher) trips over when
    a later test registers the CPU overrides (real workers register them first)."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", _NGRAM_CHECK], cwd=root, capture_output=True,
                         text=True, timeout=300, check=True).stdout.strip().splitlines()[-1]
    ids, length, conf, miss = json.loads(out)
    assert ids == [14, 15, 16, 17] and length == 3
    assert conf == pytest.approx([0.75] * 4) and miss is None


def test_make_match_source():
    assert make_match_source({"source": "none"}) is None
    assert isinstance(make_match_source({"source": "suffix", "suffix_max_tree_depth": 16}), SuffixMatch)
    with pytest.raises(ValueError):
        make_match_source({"source": "ngram"})              # needs vLLM's kernel
    assert confidence([0.5, 0.25], 2, 1) == pytest.approx([0.25, 0.25])


# ------------------------------------------------------------------ the choice

def policy(mode: str = "auto", gamma: int = 4, per_token: float = 0.002) -> DraftPolicy:
    """A policy that has seen a CPU-like batch-1 machine: 30 ms per step + per_token."""
    p = DraftPolicy(PolicyConfig(gamma=gamma, mode=mode))
    for i in range(40):
        k = i % (gamma + 1)
        p.observe_step(1 + k, k, 0.030 + per_token * (1 + k) + 0.004, 0.004, gamma)
    return p


def cands(rows: list[list[float]], width: int = 4) -> Candidates:
    probs = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, r in enumerate(rows):
        probs[i, :len(r)] = torch.tensor(r, dtype=torch.float64)
    return Candidates("suffix", probs, torch.tensor([len(r) for r in rows]))


def test_match_taken_where_it_beats_the_streams_streams_elsewhere():
    p = policy()
    streams = torch.tensor([[0.5, 0.3, 0.2, 0.1], [0.9, 0.8, 0.7, 0.6]])
    c = cands([[0.95, 0.95, 0.95, 0.95], []])              # request 0 has a long match
    choice = p.decide(streams, 2, c)
    assert choice.source == ["suffix", STREAMS]
    assert choice.lengths[0] >= 3 and choice.lengths[1] >= 1


def test_weak_match_loses_to_confident_streams():
    p = policy()
    choice = p.decide(torch.tensor([[0.95, 0.9, 0.9, 0.85]]), 1, cands([[0.5, 0.5]]))
    assert choice.source == [STREAMS]


def test_match_drafts_even_when_the_pass_is_skipped():
    """Streams poor (the pass does not pay), a strong match: the pass is skipped and the
    match drafts anyway (no draft-pass cost)."""
    p = policy(per_token=0.004)
    for _ in range(5):
        p.decide(torch.full((1, 4), 0.05), 1)               # the streams' running profile: poor
    c = cands([[0.95] * 4])
    plan = p.plan(1, p.expected(c))
    assert not plan.run_pass or plan.probe
    choice = p.decide(None, 1, c)
    assert choice.source == ["suffix"] and choice.lengths.tolist() == [4]
    assert p.stats.drafts_by_source == {"suffix": 1}


def test_steps_without_speculation_counts_candidate_steps_once():
    p = policy(per_token=0.004)
    for _ in range(5):
        p.decide(torch.full((1, 4), 0.05), 1)
    before = p.stats.steps_without_speculation
    c = cands([[0.95] * 4])
    assert not p.plan(1, p.expected(c)).run_pass
    p.decide(None, 1, c)                                     # drafted: not a step without
    assert p.stats.steps_without_speculation == before
    assert not p.plan(1, p.expected(cands([[]]))).run_pass
    p.decide(None, 1, cands([[]]))                            # nothing: counted once
    assert p.stats.steps_without_speculation == before + 1


def batch16_policy() -> DraftPolicy:
    """A policy that has seen batch 16 on a machine where a verified token costs 3 ms of a
    70 ms step, and poor streams."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    for i in range(40):
        k = i % 5
        p.observe_step(16 + k, k, 0.070 + 0.003 * k, 0.0, 0)
    for _ in range(3):
        p.decide(torch.full((16, 4), 0.05), 16)
    return p


def test_matches_that_cannot_pay_are_dropped_before_the_choice():
    """Batch 16 on a machine where a verified token costs 3 ms: a weak match (first token
    0.3) cannot pay for its verification and the plan tells the proposer to drop it (the
    streams-only decision, no per-request choice); a strong one is kept."""
    p = batch16_policy()
    weak = cands([[0.3, 0.3]] + [[]] * 15)
    assert not p.plan(16, p.expected(weak)).use_candidates
    strong = cands([[0.99] * 4] + [[]] * 15)
    assert p.plan(16, p.expected(strong)).use_candidates


def test_matches_looked_up_every_step_only_where_they_can_pay():
    """Batch 16 where no match pays: the lookup (tree feed + search) runs every
    ``recheck_every`` steps; once one could pay, every step for a while."""
    p = batch16_policy()
    due = []
    for _ in range(12):
        due.append(p.match_due(16))
        p.plan(16, p.expected(cands([[0.3, 0.3]] + [[]] * 15)) if due[-1] else None)
    assert sum(due) == 3
    p.plan(16, p.expected(cands([[0.99] * 4] + [[]] * 15)))
    assert all(p.match_due(16) for _ in range(3))


def test_small_batches_look_up_every_step():
    """Batch 1 where no match has paid for a while still looks every step: a lookup costs
    a fraction of a percent of the step there, and a skipped one can miss the start of a
    repetition."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    for i in range(40):
        p.observe_step(1 + i % 5, i % 5, 0.030 + 0.001 * (1 + i % 5))
    due = []
    for _ in range(12):
        due.append(p.match_due(1))
        p.plan(1, p.expected(cands([[0.01, 0.01]])) if due[-1] else None)
    assert all(due)


def test_lookups_pause_where_they_cost_more_than_their_drafts_saved():
    """Batch 16: every lookup finds a match that looks worth drafting, but each lookup costs
    1.2 ms and the steps that drafted its matches emitted no more tokens than a step
    without drafts, in more time (the match path as measured on MT-Bench at batch 16).
    Lookups pause, a probe now and then; batch 1, where match drafts saved time, keeps
    looking; once a probe's drafts pay, lookups are back every step."""
    p = batch16_policy()
    strong = cands([[0.99] * 4] + [[]] * 15)

    def run(steps: int, produced: int) -> list[bool]:
        due = []
        for _ in range(steps):
            due.append(p.match_due(16))
            if due[-1]:
                p.observe_lookup(16, 0.0012)
            p.plan(16, p.expected(strong) if due[-1] else None)
            if due[-1]:
                p.observe_outcome(16, produced, 0.075, matched=True)     # base step: 70 ms
        return due

    lossy = run(200, 16)
    assert all(lossy[:20])
    assert 1 <= sum(lossy[-100:]) <= 4, lossy[-100:]
    assert p.summary()["match_budget"][-1]["paused_for"] > 0
    for _ in range(30):     # batch 1: 0.3 ms lookups, match drafts worth 2 tokens a step
        p.observe_lookup(1, 0.0003)
        p.observe_outcome(1, 3, 0.030, matched=True)
    assert p.budget.due(1, p.stats.steps)
    paying = run(300, 40)
    assert all(paying[-50:])
    off = batch16_policy()                                  # the ablation switch
    off.cfg.match_budget = False
    for _ in range(100):
        off.observe_lookup(16, 0.0012)
        off.observe_outcome(16, 16, 0.075, matched=True)
        off.plan(16, off.expected(strong))
    assert off.match_due(16)


def test_only_existing_match_tokens_are_drafted_on_a_non_monotonic_cost_curve():
    """A CPU where verifying more tokens is faster (oneDNN's slow path for 1-2 rows): the
    best count is past what exists. A request without a match must not be given drafts
    (the online server crashed on exactly that), nor a match more than its own tokens."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    for _ in range(6):
        for tokens, secs in [(2, 0.060), (3, 0.062), (4, 0.045), (5, 0.044), (6, 0.044)]:
            p.observe_step(tokens, tokens - 2, secs, 0.0, 0)
    for _ in range(3):
        p.decide(torch.full((2, 4), 0.05), 2)
    choice = p.decide(None, 2, cands([[0.9], []]))
    assert choice.lengths.tolist() in ([1, 0], [0, 0])
    assert choice.source[1] is None


def test_pass_runs_when_no_request_has_a_match():
    p = policy(per_token=0.0005)
    for _ in range(5):
        p.decide(torch.full((2, 4), 0.9), 2)
    assert p.plan(2, p.expected(cands([[], []]))).run_pass


def test_match_calibration_learns_from_its_own_acceptance():
    p = policy()
    c = cands([[0.9, 0.9, 0.9, 0.9]])
    before = p.expected(c)[0, 0].item()
    for _ in range(100):                                    # first matched token right 20% of the time
        p.observe_acceptance(c.probs.float(), torch.tensor([4]),
                             torch.tensor([1 if torch.rand(()) < 0.2 else 0]), "suffix")
    after = p.expected(c)[0, 0].item()
    assert after < 0.45 < before
    assert p.calibration.sources["suffix"].per_position()[0]["n"] == 100
    assert p.calibration.streams.per_position()[0]["n"] == 0  # the streams' calibration untouched
    assert p.decide(torch.tensor([[0.9, 0.8, 0.7, 0.6]]), 1, c).source == [STREAMS]


def test_fixed_mode_takes_the_draft_with_more_expected_tokens():
    p = DraftPolicy(PolicyConfig(gamma=4, mode="fixed", min_draft_prob=0.4))
    streams = torch.tensor([[0.9, 0.5, 0.3, 0.9], [0.95, 0.95, 0.95, 0.95]])
    choice = p.decide(streams, 2, cands([[0.9, 0.9, 0.9, 0.9], [0.6]]))
    assert choice.source == ["suffix", STREAMS]
    assert choice.lengths.tolist() == [4, 4]
    assert p.decide(streams).lengths.tolist() == [2, 4]              # streams alone: the cut as before


def test_forced_off_blocks_every_source():
    p = DraftPolicy(PolicyConfig(gamma=4, force_off_steps=10))
    for i in range(40):
        p.observe_step(1 + i % 5, i % 5, 0.030 + 0.001 * (1 + i % 5))
    c = cands([[0.99] * 4])
    for _ in range(10):
        assert not p.match_due(1)       # no lookups either: nothing drafted, nothing paid for
        plan = p.plan(1, p.expected(c))
        choice = p.decide(torch.full((1, 4), 0.9) if plan.run_pass else None, 1, c)
        assert choice.lengths.tolist() == [0]


# ------------------------------------------------------------------ config and stats plumbing

def test_match_config_key_env_checkpoint_and_widening(tiny_llama_dir, tmp_path, monkeypatch):
    from specstream_vllm.checkpoint import LoraSpec
    from specstream_vllm.reference.init import init_checkpoint
    from tests.test_startup_errors import engine_config
    streams = init_checkpoint(tiny_llama_dir, tmp_path / "streams", num_streams=3,
                              num_stream_layers=2, lora=LoraSpec(rank=2))
    base = {"method": "specstream", "model": str(streams)}
    cfg = lambda spec: engine_config(tiny_llama_dir, spec)  # noqa: E731
    match = lambda spec: cfg(spec).model_config.hf_config.specstream_policy["match"]  # noqa: E731
    from specstream_vllm.vllm_integration.config import DEFAULT_MATCH
    assert match(base)["source"] == DEFAULT_MATCH
    m = match(dict(base, match="ngram", prompt_lookup_max=3))
    assert (m["source"], m["ngram_min"], m["ngram_max"], m["max_tokens"]) == ("ngram", 3, 3, 3)
    c = cfg(dict(base, match="suffix", match_tokens=6, suffix_decoding_max_tree_depth=16))
    m = c.model_config.hf_config.specstream_policy["match"]
    assert (m["source"], m["max_tokens"], m["suffix_max_tree_depth"]) == ("suffix", 6, 16)
    assert c.speculative_config.num_speculative_tokens == 6 and c.num_lookahead_tokens == 6
    assert c.model_config.hf_config.specstream["num_streams"] == 3  # streams stay at their gamma
    assert cfg(dict(base, match="none", match_tokens=6)).speculative_config.num_speculative_tokens == 3
    monkeypatch.setenv("SPECSTREAM_MATCH", "none")
    assert match(dict(base, match="suffix"))["source"] == "none"
    monkeypatch.delenv("SPECSTREAM_MATCH")
    raw = json.loads((streams / "config.json").read_text())   # the checkpoint's default proposal
    raw["speculators_config"]["proposal_methods"] = [{"proposal_type": "greedy", "match": "ngram"}]
    (streams / "config.json").write_text(json.dumps(raw))
    assert match(base)["source"] == "ngram" and match(dict(base, match="suffix"))["source"] == "suffix"
    with pytest.raises(ValueError, match="match"):
        cfg(dict(base, match="bm25"))
    with pytest.raises(ValueError, match="match_tokens"):
        cfg(dict(base, match_tokens=0))
    with pytest.raises(Exception, match="match"):           # vLLM's own refusal for other methods
        cfg({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3, "match": "suffix"})


def test_per_source_stats_survive_vllms_msgpack():
    """The engine core sends SchedulerStats to the front end with vLLM's msgpack encoder:
    the per-source field is a real dataclass field, not a dropped attribute."""
    from specstream_vllm.vllm_integration.patches import metrics
    metrics.add_stats_field()  # what the plugin does when vllm.v1.spec_decode.metrics loads
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder
    from vllm.v1.spec_decode.metrics import SpecDecodingStats
    s = SpecDecodingStats.new(4)
    s.specstream_sources = {"suffix": [2, 7, 5], "streams": [1, 4, 1]}
    out = EngineCoreOutputs(outputs=[], scheduler_stats=SchedulerStats(spec_decoding_stats=s))
    got = MsgpackDecoder(EngineCoreOutputs).decode(MsgpackEncoder().encode(out))
    assert got.scheduler_stats.spec_decoding_stats.specstream_sources == s.specstream_sources
    assert SpecDecodingStats.new(4).specstream_sources is None


def test_benchmark_methods_and_per_source_counters(shipped_streams):
    from benchmarks.methods import build_methods
    from specstream_vllm.spec_counters import from_prometheus_text
    if shipped_streams is None:
        pytest.skip("no shipped streams")
    ms = {m.name: m for m in build_methods(["specstream-streams", "specstream-suffix:8", "ngram"],
                                           streams=str(shipped_streams))}
    assert ms["specstream-streams"].speculative_config["match"] == "none"
    hybrid = ms["specstream-suffix:8"].speculative_config
    assert (hybrid["method"], hybrid["match"], hybrid["match_tokens"]) == ("specstream", "suffix", 8)
    assert ms["specstream-suffix:8"].keeps_request_state            # a response cache, like suffix
    assert not ms["specstream-streams"].keeps_request_state
    text = "\n".join([
        'vllm:spec_decode_num_drafts_total{engine="0"} 10',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0"} 12',
        'vllm:spec_decode_specstream_source_drafts_total{engine="0",source="streams"} 4',
        'vllm:spec_decode_specstream_source_drafts_total{engine="0",source="suffix"} 6',
        'vllm:spec_decode_specstream_source_draft_tokens_total{engine="0",source="suffix"} 20',
        'vllm:spec_decode_specstream_source_accepted_tokens_total{engine="0",source="suffix"} 9'])
    c = from_prometheus_text(text)
    assert c.sources == {"streams": [4, 0, 0], "suffix": [6, 20, 9]}
    by = c.to_json()["by_source"]
    assert by["suffix"]["draft_share"] == pytest.approx(0.6) and by["suffix"]["mean_acceptance_length"] == 2.5
    assert (c - c).sources == {"streams": [0, 0, 0], "suffix": [0, 0, 0]}


# ------------------------------------------------------------------ real engine

REPEAT = ("Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape, "
          "honeydew, kiwi, lemon, mango, nectarine, orange, papaya, quince, raspberry, "
          "strawberry, tangerine, ugli fruit, vanilla bean, watermelon, yam, zucchini.")
CODE = ("Copy this Python function exactly:\n\ndef moving_average(values, window):\n"
        "    result = []\n    for i in range(len(values) - window + 1):\n"
        "        chunk = values[i:i + window]\n        result.append(sum(chunk) / window)\n"
        "    return result\n")
FRESH = "Write a haiku about autumn leaves."
PROMPTS = [REPEAT, FRESH, CODE, "What is the capital of France?",
           "Give me a short tip for learning to cook.", "Why is the sky blue? Answer briefly.",
           "List three uses of a paperclip.", "Translate 'good morning' into Spanish."]
MAX_TOKENS = [64, 40, 64, 24, 40, 40, 33, 17]


@pytest.fixture(scope="module")
def hybrid_runs(smollm2_dir, shipped_streams, tmp_path_factory):
    pytest.importorskip("arctic_inference")
    from tests.test_vllm_integration import run_engine, streams_for_smollm2
    tmp = tmp_path_factory.mktemp("match")
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp)
    job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
           "batches": [[0], [1], list(range(8))], "max_num_seqs": 8}
    base = run_engine(job, tmp, "base")
    log, dump = tmp / "drafts.jsonl", tmp / "policy.json"
    spec = run_engine(dict(job, spec={"method": "specstream", "model": str(streams),
                                      "num_speculative_tokens": 4, "match": "suffix",
                                      "match_tokens": 4, "draft_policy": "fixed"},
                           env={"SPECSTREAM_DRAFT_LOG": str(log), "SPECSTREAM_DRAFT_PRECISION": "exact", "SPECSTREAM_POLICY_DUMP": str(dump),
                                "SPECSTREAM_MIN_DRAFT_PROB": "0"}), tmp, "hybrid")
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    return base, spec, rows, json.loads(dump.read_text())


@pytest.mark.vllm
def test_hybrid_greedy_float32_identical_batch1_and_batch8(hybrid_runs):
    base, spec, _, _ = hybrid_runs
    for b0, b1 in zip(base["batches"], spec["batches"]):
        assert b0["outputs"] == b1["outputs"], f"prompts {b0['indices']} differ"


def rows_of(rows: list[dict], first: int) -> list[dict]:
    """The draft-log rows of a request run alone from row ``first`` (its first row) on:
    the block of rows with the same prompt (at batch 8 the suffix cache has seen every
    prompt's answer once already)."""
    prefix = rows[first]["context"]
    out = []
    for r in rows[first:]:
        if r["context"][:len(prefix)] != prefix:
            break
        out.append(r)
    return [r for r in out if r["source"]]


@pytest.mark.vllm
def test_repeats_drafted_from_the_match_new_text_from_the_streams(hybrid_runs):
    """Batch 1 runs REPEAT alone, then FRESH alone: the draft log says which source each
    step's draft came from."""
    _, _, rows, _ = hybrid_runs
    repeat = rows_of(rows, 0)
    fresh = rows_of(rows, next(i for i, r in enumerate(rows)
                               if r["context"][:len(rows[0]["context"])] != rows[0]["context"]))
    share = lambda rs, src: sum(r["source"] == src for r in rs) / len(rs)  # noqa: E731
    assert len(repeat) >= 5 and len(fresh) >= 10
    assert share(repeat, "suffix") >= 0.6, [r["source"] for r in repeat]
    assert share(fresh, STREAMS) >= 0.5, [r["source"] for r in fresh]
    assert share(repeat, "suffix") > share(fresh, "suffix") + 0.2
    # a request proposes the draft of the source the log names
    for r in repeat + fresh:
        assert r["sent"] == (r["match"] if r["source"] == "suffix" else r["drafts"])[:len(r["sent"])]


@pytest.mark.vllm
def test_counters_per_source(hybrid_runs):
    _, spec, _, dump = hybrid_runs
    m = spec["metrics"]
    drafts = {s: m.get(f"vllm:spec_decode_specstream_source_drafts{{source={s}}}", 0)
              for s in ("streams", "suffix")}
    accepted = {s: m.get(f"vllm:spec_decode_specstream_source_accepted_tokens{{source={s}}}", 0)
                for s in ("streams", "suffix")}
    assert drafts["streams"] > 0 and drafts["suffix"] > 0
    assert sum(drafts.values()) == m["vllm:spec_decode_num_drafts"]
    assert sum(accepted.values()) == m["vllm:spec_decode_num_accepted_tokens"]
    assert accepted["suffix"] / drafts["suffix"] > accepted["streams"] / drafts["streams"]
    assert set(dump["sources"]) == {"streams", "suffix"} and dump["sources"]["suffix"]["drafts"] > 0
    assert dump["match"]["active_requests"] <= 8
