"""The proposer's device path (accelerators): drafts returned as a device tensor, cut per
request on the device from past steps' statistics, with no host read of a tensor in the
proposer's step.

On this CPU the path is switched on with ``SPECSTREAM_DEVICE_DRAFTS=1`` and checked in
real vLLM engines: greedy float32 output identical to vLLM without speculation, drafts
equal to the reference model's, and, with ``SPECSTREAM_SYNC_AUDIT``, no call in the
proposer's modules that would wait for a GPU (``.item()``, ``.tolist()``, ``.cpu()``,
``bool(tensor)``, ...) in any step after the first two; the host path, audited the same
way, makes such calls every drafting step (the audit can fail).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from specstream_vllm.policy import DraftPolicy, PolicyConfig, cut_inputs, device_lengths
from specstream_vllm.policy.calibration import Calibrator
from tests.test_fused_pass import anchor_streams
from tests.test_vllm_integration import (MAX_TOKENS, PROMPTS, draft_match_rate, outputs,
                                         run_engine, streams_for_smollm2)

GAMMA = 4


# ----------------------------------------------------------------------- no engine

def test_ratio_table_reproduces_the_host_calibration():
    """Where every bin has observations the device's ``p * ratio[j, bin(p)]`` is the host's
    ``calibrate(p)``."""
    g, bins = 4, 10
    cal = Calibrator(g, bins, prior=16.0, decay=0.9995)
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(g).repeat_interleave(400)
    p = (torch.arange(400, dtype=torch.float64) / 400 + 1e-3).repeat(g).clamp(max=0.999)
    cal.observe(pos, p, torch.rand(len(p), generator=gen, dtype=torch.float64) < p * 0.7)
    probs = torch.rand(64, g, generator=gen, dtype=torch.float64)
    b = (probs * bins + 1e-6).clamp(0, bins - 1e-9).long()
    j = torch.arange(g).expand(64, g)
    on_device = (probs * torch.from_numpy(cal.ratio_table())[j, b]).clamp(0, 1)
    assert torch.allclose(on_device, torch.from_numpy(cal.calibrate(probs)), atol=1e-12)


def test_device_lengths_keep_the_prefix_that_clears_the_cut():
    policy = DraftPolicy(PolicyConfig(gamma=GAMMA, mode="fixed", min_draft_prob=0.3))
    cut = cut_inputs(policy, reqs=3, g=GAMMA)
    probs = torch.tensor([[0.9, 0.8, 0.2, 0.9], [0.1, 0.9, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5]])
    assert device_lengths(probs, torch.from_numpy(cut.ratio), cut).tolist() == [2, 0, 4]
    # a threshold on the calibrated chain: with no observations the ratio is 1, so the
    # chain is the running product of the raw probabilities
    cut.tau, cut.min_prob = 0.2, 0.0
    assert device_lengths(probs, torch.from_numpy(cut.ratio), cut).tolist() == [2, 0, 2]
    cut.cap = 1
    assert device_lengths(probs, torch.from_numpy(cut.ratio), cut).tolist() == [1, 0, 1]


def test_warm_up_cut_spreads_about_gamma_drafts_over_the_batch():
    policy = DraftPolicy(PolicyConfig(gamma=GAMMA))          # auto, costs not yet measured
    assert cut_inputs(policy, reqs=1, g=GAMMA).cap == GAMMA
    assert cut_inputs(policy, reqs=2, g=GAMMA).cap == 2
    assert cut_inputs(policy, reqs=16, g=GAMMA).cap == 1


def test_candidates_are_taken_up_to_their_last_paying_token():
    policy = DraftPolicy(PolicyConfig(gamma=GAMMA))
    chain = torch.tensor([[0.9, 0.8, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0], [0.6, 0.3, 0.1, 0.05]],
                         dtype=torch.float64)
    lengths = torch.tensor([3, 0, 4])
    # no pass this step, costs unknown (threshold 0): every existing draft token is taken
    assert policy.take_candidates(3, chain, lengths, with_pass=False) == [3, 0, 4]
    # with a pass, against a running stream profile worth 1.2 expected tokens
    policy.profile[:] = torch.tensor([0.7, 0.4, 0.1, 0.0], dtype=torch.float64)
    assert policy.take_candidates(3, chain, lengths, with_pass=True) == [3, 0, 0]


def test_scheduler_drops_the_padding_of_the_device_tensor():
    from vllm.v1.outputs import DraftTokenIds

    from specstream_vllm.vllm_integration.patches.scheduler import _drop_padding
    d = DraftTokenIds(["a", "b", "c", "d"], [[5, 6, -1, -1], [-1, -1, -1, -1], [1, 2, 3, 4], []])
    _drop_padding(d)
    assert d.draft_token_ids == [[5, 6], [], [1, 2, 3, 4], []]


def test_sync_audit_counts_host_reads_in_the_proposer_modules(tmp_path):
    """The audit sees a host read made inside the integration's modules (here the one
    ``draft_common_metadata`` makes when its caller does not pass ``max_seq_len``), and
    none where the caller passes it; a read in a test file is not counted."""
    from specstream_vllm.vllm_integration.draft_attention import draft_common_metadata
    from specstream_vllm.vllm_integration.sync_audit import SyncAudit
    audit = SyncAudit(str(tmp_path / "audit.jsonl"))
    common = dict(query_start_loc_cpu=torch.tensor([0, 2], dtype=torch.int32),
                  seq_lens_cpu=torch.tensor([7], dtype=torch.int32),
                  positions=torch.tensor([5, 6]), slot_mapping=torch.tensor([5, 6]),
                  block_table=torch.zeros(1, 4, dtype=torch.int32), query_len=2,
                  device=torch.device("cpu"))
    for max_seq_len in (None, 7):
        with audit.counting():
            draft_common_metadata(**common, max_seq_len=max_seq_len)
            torch.tensor([1.0]).item()                      # this file: not audited
        audit.step_done("host", 1)
    steps = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [sum(s["calls"].values()) for s in steps] == [1, 0]
    assert next(iter(steps[0]["calls"])).startswith("draft_attention.py:")


# ----------------------------------------------------------------------- engines

def _spec(streams: Path, match: str, **extra) -> dict:
    return {"method": "specstream", "model": str(streams), "num_speculative_tokens": GAMMA,
            "match": match, **extra}


@pytest.fixture(scope="module")
def device_runs(smollm2_dir, shipped_streams, tmp_path_factory):
    """No speculation; the device path with every stream drafting (draft log: compared
    with the reference); the device path with the default policy and match source,
    audited; the fused pass of anchor streams on the device path, audited; the host path,
    audited (the contrast)."""
    tmp = tmp_path_factory.mktemp("device_drafts")
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp)
    anchor = anchor_streams(smollm2_dir, tmp)
    base_job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
                "batches": [[i] for i in range(len(PROMPTS))] + [list(range(len(PROMPTS)))]}
    device = {"SPECSTREAM_DEVICE_DRAFTS": "1", "SPECSTREAM_RAISE_ERRORS": "1"}
    fixed = {"SPECSTREAM_DRAFT_POLICY": "fixed", "SPECSTREAM_MIN_DRAFT_PROB": "0",
             "SPECSTREAM_DRAFT_PRECISION": "exact"}
    jobs = {
        "base": base_job,
        "fixed": dict(base_job, spec=_spec(streams, "none"),
                      env={**device, **fixed, "SPECSTREAM_DRAFT_LOG": str(tmp / "fixed.drafts.jsonl")}),
        "auto": dict(base_job, spec=_spec(streams, "suffix"), env=device),
        "fused": dict(base_job, spec=_spec(anchor, "suffix", draft_pass="fused"),
                      env={**device, **fixed}),
        "host": dict(base_job, spec=_spec(streams, "none"),
                     env={**fixed, "SPECSTREAM_RAISE_ERRORS": "1"}),
    }
    runs = {}
    for name, job in jobs.items():
        env = dict(job.get("env", {}), SPECSTREAM_POLICY_DUMP=str(tmp / f"{name}.policy.json"))
        if name in ("auto", "fused", "host"):
            env["SPECSTREAM_SYNC_AUDIT"] = str(tmp / f"{name}.audit.jsonl")
        runs[name] = run_engine(dict(job, env=env), tmp, name)
    return runs, tmp, streams


def _audit(tmp: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (tmp / f"{name}.audit.jsonl").read_text().splitlines()]


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["fixed", "auto", "fused"])
def test_device_path_greedy_float32_token_identical_batch1_and_batch8(device_runs, name):
    runs, tmp, _ = device_runs
    assert outputs(runs[name]) == outputs(runs["base"])
    m = runs[name]["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0 and m["vllm:spec_decode_num_accepted_tokens"] > 0
    dump = json.loads((tmp / f"{name}.policy.json").read_text())
    assert dump["draft_output"] == "device" and dump["errors"] == 0
    if name == "fused":
        assert dump["draft_passes"]["fused"] > 0


@pytest.mark.vllm
def test_device_path_drafts_equal_reference_model(device_runs, smollm2_fp32):
    _, tmp, streams = device_runs
    rate = draft_match_rate(smollm2_fp32[0], streams, tmp / "fixed.drafts.jsonl", GAMMA)
    assert rate >= 0.97, f"only {rate:.1%} of draft tokens match the reference"


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["auto", "fused"])
def test_device_path_reads_no_tensor_on_the_host_in_steady_state(device_runs, name):
    _, tmp, _ = device_runs
    steps = _audit(tmp, name)
    assert len(steps) > 50 and all(s["path"] == "device" for s in steps)
    late = Counter()
    for s in steps[2:]:     # the first steps build one-time state (the bf16 draft head)
        late.update(s["calls"])
    assert not late, f"host reads in the device path's steady state: {dict(late)}"


@pytest.mark.vllm
def test_host_path_audited_the_same_way_reads_every_drafting_step(device_runs):
    runs, tmp, _ = device_runs
    assert outputs(runs["host"]) == outputs(runs["base"])
    steps = _audit(tmp, "host")
    assert all(s["path"] == "host" for s in steps)
    reading = [s for s in steps[2:] if s["calls"]]
    assert len(reading) > 0.5 * len(steps[2:]), "the audit missed the host path's reads"
