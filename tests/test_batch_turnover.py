"""Whether finished requests are replaced (a server, a queue) or the batch only drains
(batch_turnover.py), and what the draft policy then pays for a draft (no vLLM)."""
from __future__ import annotations

import torch

from specstream_vllm.vllm_integration.batch_turnover import Turnover
from specstream_vllm.vllm_integration.draft_policy import DraftPolicy, PolicyConfig

from tests.test_draft_policy import feed_costs


def draining(t: Turnover, n: int = 16, every: int = 3, first: int = 0) -> None:
    """n requests (ids from ``first``) start together; one finishes every ``every`` steps;
    nothing joins."""
    ids = list(range(first, first + n))
    while ids:
        for _ in range(every):
            t.observe(ids)
        ids = ids[1:]


def serving(t: Turnover, n: int = 16, steps: int = 120, every: int = 3, lag: int = 2) -> None:
    """n requests running; one finishes every ``every`` steps and a new one joins ``lag``
    steps later (a client sending its next request)."""
    ids, nxt, joining = list(range(n)), n, []
    for step in range(steps):
        joining = [(s, r) for s, r in joining if not (s <= step and ids.append(r))]
        if step % every == 0:
            ids.pop(0)
            joining.append((step + lag, nxt))
            nxt += 1
        t.observe(ids)


def test_a_draining_batch_is_told_from_a_server():
    t = Turnover()
    assert t.replaced == 1.0                   # nothing seen: priced as before
    draining(t)
    assert t.replaced < 0.1
    s = Turnover()
    serving(s)
    assert s.replaced > 0.95


def test_a_server_after_a_draining_batch_is_a_server_again():
    t = Turnover()
    draining(t)
    serving(t, steps=60)
    assert t.replaced > 0.9


def test_rounds_of_a_draining_batch_stay_draining():
    """Offline rounds back to back: the next round's requests join right after the last
    one leaves; they must not count as replacing the previous round's last leaves."""
    t = Turnover()
    for r in range(4):
        draining(t, n=8, every=2, first=8 * r)     # leaves within ``window`` steps of the end
    assert t.replaced < 0.1


def test_a_leave_that_empties_the_batch_says_nothing():
    """Batch 1, one request after another (or rounds of a benchmark): the last request
    leaving is no evidence either way."""
    t = Turnover()
    for r in range(20):
        for _ in range(5):
            t.observe([r])
    assert t.replaced == 1.0 and t.leaves == 0
    for r in range(20):                        # rounds of 4 requests finishing together
        for _ in range(5):
            t.observe([4 * r + i for i in range(4)])
    assert t.replaced == 1.0


def test_drafts_that_pay_in_a_server_do_not_in_a_draining_batch():
    """Batch 16 where a drafted token costs ~half a request's share of the step: worth it
    at 70% acceptance while freed slots are refilled, not while the batch only drains
    (an accepted token then saves its request's part of a step, not a token's worth)."""
    probs = torch.full((16, 4), 0.9)

    def drafts(observe) -> int:
        p = DraftPolicy(PolicyConfig(gamma=4, drain_value=True))
        feed_costs(p, per_step=0.040, per_token=0.0025, reqs=16)
        observe(p.turnover)
        return int(p.choose(probs).sum())

    assert drafts(lambda t: serving(t)) > 0
    assert drafts(lambda t: draining(t)) == 0
    p = DraftPolicy(PolicyConfig(gamma=4, drain_value=True))
    feed_costs(p, per_step=0.040, per_token=0.0025, reqs=16)
    draining(p.turnover)
    assert p._value(1) == 1.0                  # a lone request is its run's longest
    assert 0.0 < p._value(16) < 0.6


def test_drain_pricing_is_opt_in(monkeypatch):
    """Off unless asked for: at batch 4 it was slower (0.95x against 1.04x for the same
    engine pricing every token as in a server) and at 16 no faster (README)."""
    from specstream_vllm.vllm_integration.config import resolve_policy
    assert resolve_policy({}).drain_value is False
    monkeypatch.setenv("SPECSTREAM_POLICY_DRAIN_VALUE", "1")
    assert resolve_policy({}).drain_value is True
    p = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(p, per_step=0.040, per_token=0.0025, reqs=16)
    for step in range(60):
        p.observe_requests(range(step // 3, 16))
    assert p._value(16) == 1.0 and p.turnover.leaves == 0
