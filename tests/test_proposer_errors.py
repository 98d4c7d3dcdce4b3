"""A drafting bug costs speedup, not the server: without tensor parallelism a failed
propose() logs, counts and returns no drafts (verification keeps the output exact)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from specstream_vllm.vllm_integration import proposer, vllm_ops


def broken_proposer() -> proposer.SpecStreamProposer:
    p = object.__new__(proposer.SpecStreamProposer)
    p.errors, p._pending, p.last_sources = 0, {"r0": ("streams", [0.5])}, ["streams"]
    p._profile, p._raise_errors, p._audit, p.device_path = False, False, None, None

    def fail(**kwargs):
        raise AttributeError("'NoneType' object has no attribute 'token_ids'")
    p._propose = fail
    return p


def call(p):
    return p.propose(sampled_token_ids=[[1], [2], [3]], aux_hidden_states=None,
                     spec_decode_metadata=None,
                     common_attn_metadata=SimpleNamespace(num_reqs=3), num_speculative_tokens=4)


def test_failed_drafting_runs_the_step_without_drafts(monkeypatch, caplog):
    monkeypatch.setattr(vllm_ops, "tp_world_size", lambda: 1)
    p = broken_proposer()
    with caplog.at_level("ERROR", logger="vllm.specstream"):
        assert call(p) == [[], [], []]
        assert call(p) == [[], [], []]
    assert p.errors == 2 and p._pending == {} and p.last_sources == [None] * 3
    assert sum("drafting failed" in r.getMessage() for r in caplog.records) == 1   # logged once


def test_errors_raise_under_tensor_parallelism_and_in_tests(monkeypatch):
    monkeypatch.setattr(vllm_ops, "tp_world_size", lambda: 2)   # a collective could fall out of step
    with pytest.raises(AttributeError):
        call(broken_proposer())
    monkeypatch.setattr(vllm_ops, "tp_world_size", lambda: 1)
    p = broken_proposer()
    p._raise_errors = True          # SPECSTREAM_RAISE_ERRORS=1, read when the proposer is built
    with pytest.raises(AttributeError):
        call(p)


def test_debug_switches_are_read_when_the_proposer_is_built(monkeypatch):
    """Set after import, before the engine starts (as SpeculativeEngine and the tests do)."""
    from specstream_vllm.vllm_integration import proposer as module
    monkeypatch.setattr(module, "make_match_source", lambda *a: None)
    hf = SimpleNamespace(specstream_policy={"match": {"source": "none"}})
    cfg = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=3),
                          model_config=SimpleNamespace(hf_config=hf))
    for raise_errors, log in (("0", ""), ("1", "/tmp/drafts.jsonl")):
        monkeypatch.setenv("SPECSTREAM_RAISE_ERRORS", raise_errors)
        monkeypatch.setenv("SPECSTREAM_DRAFT_LOG", log)
        p = module.SpecStreamProposer(cfg, "cpu", runner=object())
        assert p._raise_errors is (raise_errors == "1") and p._draft_log == (log or None)
