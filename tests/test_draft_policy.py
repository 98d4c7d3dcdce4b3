"""The cost-aware draft policy on synthetic inputs (no vLLM): probabilities, acceptance
and step times in, draft lengths out."""
from __future__ import annotations

import pytest
import torch

from specstream_vllm.policy import DraftPolicy, PolicyConfig
from specstream_vllm.policy.calibration import Calibrator
from specstream_vllm.policy.costs import CostModel


def feed_costs(policy: DraftPolicy, per_step: float, per_token: float, reqs: int, *,
               draft_per_token: float = 0.0002, steps: int = 40) -> None:
    """Step times of a machine where verifying N tokens costs per_step + per_token * N."""
    g = policy.cfg.gamma
    for i in range(steps):
        k = i % (g + 1)                       # the policy varies the draft count itself
        n = reqs + reqs * k
        draft = 0.001 + draft_per_token * reqs * g
        policy.observe_step(n, reqs * k, per_step + per_token * n + draft, draft, reqs * g)


def run_steps(policy: DraftPolicy, probs: torch.Tensor, steps: int = 30) -> list[torch.Tensor]:
    out = []
    for _ in range(steps):
        plan = policy.plan(probs.shape[0])
        out.append(policy.decide(probs[:, :plan.depth]).lengths if plan.run_pass
                   else torch.zeros(probs.shape[0], dtype=torch.int64))
    return out


def test_cost_model_fits_a_line():
    m = CostModel(2, decay=0.99, slope_prior=[0.5])
    for n in [1, 3, 5, 8, 2, 13, 21, 4] * 5:
        m.add([1.0, float(n)], 0.02 + 0.004 * n)
    a, b = m.weights().tolist()
    assert a == pytest.approx(0.02, rel=0.05) and b == pytest.approx(0.004, rel=0.05)


def test_cost_model_slope_prior_when_batch_never_changes():
    m = CostModel(2, decay=0.99, slope_prior=[0.5])
    for _ in range(30):
        m.add([1.0, 16.0], 0.160)
    a, b = m.weights().tolist()
    assert b == pytest.approx(0.005, rel=0.1)          # half of the mean cost per token
    assert m.predict([1.0, 16.0]) == pytest.approx(0.160, rel=0.02)


def test_no_drafts_when_marginal_cost_exceeds_gain():
    """Each verified token costs as much as a whole step's worth of throughput: nothing pays."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(p, per_step=0.002, per_token=0.010, reqs=8)
    probs = torch.full((8, 4), 0.6)
    lengths = p.decide(probs).lengths
    assert lengths.tolist() == [0] * 8
    assert p.stats.steps_without_speculation >= 1


def test_drafts_when_they_pay():
    """Verification nearly free per extra token (small batch): confident streams draft."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(p, per_step=0.030, per_token=0.001, reqs=1)
    lengths = p.decide(torch.tensor([[0.95, 0.9, 0.9, 0.85]])).lengths
    assert lengths.tolist() == [4]
    lengths = p.decide(torch.tensor([[0.9, 0.05, 0.9, 0.9]])).lengths
    assert lengths.tolist() == [1]                     # the chain breaks at stream 2


def test_per_request_lengths():
    p = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(p, per_step=0.030, per_token=0.003, reqs=3)
    probs = torch.tensor([[0.97, 0.95, 0.93, 0.9],
                          [0.9, 0.3, 0.2, 0.1],
                          [0.05, 0.9, 0.9, 0.9]])
    lengths = p.decide(probs).lengths.tolist()
    assert lengths[0] >= 3 and 1 <= lengths[1] < lengths[0] and lengths[2] == 0


def test_large_batch_off_small_batch_on():
    """Compute-bound machine (cost ~ proportional to tokens): speculation at batch 64
    cannot pay even with good streams, at batch 1 it does."""
    probs = torch.full((64, 4), 0.7)
    big = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(big, per_step=0.010, per_token=0.004, reqs=64)
    assert big.decide(probs).lengths.sum() == 0
    small = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(small, per_step=0.030, per_token=0.004, reqs=1)
    assert small.decide(probs[:1]).lengths.sum() > 0


def test_off_regime_skips_the_pass_and_probes_with_backoff():
    p = DraftPolicy(PolicyConfig(gamma=4, probe_min=4, probe_max=16))
    feed_costs(p, per_step=0.002, per_token=0.010, reqs=16)
    probs = torch.full((16, 4), 0.5)
    p.decide(probs)                                            # one pass: the profile is known
    plans = [p.plan(16) for _ in range(60)]
    runs = [i for i, pl in enumerate(plans) if pl.run_pass]
    assert all(plans[i].probe for i in runs)
    assert all(plans[i].rows == 4 for i in runs)      # a probe's pass: a few requests only
    assert 2 <= len(runs) <= 8                         # 4, 8, 16, 16, ... skipped steps apart
    assert p.stats.skipped_passes >= 50


def test_no_probes_while_passes_run_between_match_steps():
    """The match source wins every other step (the pass skipped), the streams the rest:
    the passes that run keep the statistics fresh, so no probe pass is added."""
    import numpy as np
    p = DraftPolicy(PolicyConfig(gamma=4, probe_min=4, probe_max=16))
    feed_costs(p, per_step=0.030, per_token=0.001, reqs=1)
    probs = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    p.decide(probs)                                            # the profile is known
    strong = np.array([[0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92]])
    ran = []
    for i in range(60):
        plan = p.plan(1, strong if i % 2 == 0 else None)
        ran.append(plan.run_pass)
        if plan.run_pass:
            p.decide(probs)
    assert not any(ran[0::2])                 # the strong match: no pass, not even a probe
    assert all(ran[1::2])
    assert p.stats.probes == 0


def test_calibration_corrects_overconfident_streams():
    p = DraftPolicy(PolicyConfig(gamma=2))
    feed_costs(p, per_step=0.030, per_token=0.008, reqs=1)
    probs = torch.tensor([[0.9, 0.9]])
    assert p.decide(probs).lengths.tolist() == [2]
    for _ in range(200):                               # stream 1 says 0.9, is right 10% of the time
        acc = torch.tensor([1 if torch.rand(()) < 0.1 else 0])
        p.observe_acceptance(probs, torch.tensor([2]), acc)
    cal = p.calibration.streams.calibrate(probs)
    assert cal[0, 0] < 0.25
    assert p.decide(probs).lengths.tolist() == [0]
    table = p.calibration.streams.per_position()
    assert table[0]["n"] == 200 and table[0]["observed"] < 0.2 and table[0]["predicted"] == pytest.approx(0.9)


def test_calibrator_only_learns_tested_positions():
    c = Calibrator(gamma=3, bins=10, prior=4, decay=1.0)
    p = DraftPolicy(PolicyConfig(gamma=3))
    p.calibration.streams = c
    # drafted 3, accepted 1: position 1 accepted, 2 rejected, 3 never tested
    p.observe_acceptance(torch.tensor([[0.8, 0.6, 0.4]]), torch.tensor([3]), torch.tensor([1]))
    assert c.total_n[:, :].sum(1).tolist() == [1, 1, 0]
    assert c.total_obs.sum(1).tolist() == [1.0, 0.0, 0.0]


def test_fixed_mode_is_min_draft_prob_cut():
    p = DraftPolicy(PolicyConfig(gamma=4, mode="fixed", min_draft_prob=0.4))
    feed_costs(p, per_step=0.002, per_token=0.010, reqs=2)   # costs are ignored
    plan = p.plan(2)
    assert plan.run_pass and plan.depth == 4
    assert p.decide(torch.tensor([[0.9, 0.5, 0.3, 0.9], [0.2, 0.9, 0.9, 0.9]])).lengths.tolist() == [2, 0]


def test_forced_high_cost_turns_speculation_off():
    probs = torch.full((1, 4), 0.9)
    on = DraftPolicy(PolicyConfig(gamma=4))
    off = DraftPolicy(PolicyConfig(gamma=4, cost_scale=50.0))
    for p in (on, off):
        feed_costs(p, per_step=0.030, per_token=0.002, reqs=1)
    assert sum(int(x.sum()) for x in run_steps(on, probs)) > 0
    assert sum(int(x.sum()) for x in run_steps(off, probs)) <= 1 * 4 * 8   # probes only... and
    assert off.stats.steps_without_speculation >= 25                          # mostly off


def test_forced_high_cost_holds_when_step_times_do_not_grow_with_tokens():
    """Batch 1 on a busy, memory-bound CPU: steps with more tokens happened to be faster,
    and the (non-negative) fit sees no per-token cost at all. A verified
    token still costs something (``min_token_cost``), so a forced cost still turns
    speculation off, and at the real cost confident streams still draft."""
    probs = torch.full((1, 4), 0.9)
    on = DraftPolicy(PolicyConfig(gamma=4))
    off = DraftPolicy(PolicyConfig(gamma=4, cost_scale=1000.0))
    for p in (on, off):
        feed_costs(p, per_step=0.030, per_token=-0.0005, reqs=1)
        assert float(p.verify.weights()[1]) == 0.0
    assert sum(int(x.sum()) for x in run_steps(on, probs)) > 0
    assert off.stats.steps_without_speculation == 0
    run_steps(off, probs)
    assert off.stats.steps_without_speculation >= 25


def test_speculation_resumes_after_forced_off_stretch():
    """Nothing learnt is lost while speculation is off: drafts come back right after."""
    p = DraftPolicy(PolicyConfig(gamma=4, force_off_steps=20))
    feed_costs(p, per_step=0.030, per_token=0.001, reqs=2)
    probs = torch.full((2, 4), 0.9)
    out = run_steps(p, probs, steps=30)
    assert all(int(x.sum()) == 0 for x in out[:20])
    assert all(int(x.sum()) > 0 for x in out[21:])


def test_warmup_without_costs_uses_the_cut():
    p = DraftPolicy(PolicyConfig(gamma=4, min_draft_prob=0.4))
    assert p.plan(1).run_pass
    assert p.decide(torch.tensor([[0.9, 0.3, 0.9, 0.9]])).lengths.tolist() == [1]


def test_bad_mode_refused():
    with pytest.raises(ValueError):
        PolicyConfig(gamma=4, mode="sometimes")


def test_probe_drafts_one_token_so_a_bad_cost_estimate_recovers():
    """Early steps with drafts were slow (compilation): the fitted fixed cost of drafting is
    huge and speculation goes off; probes still draft one token, the true (small) cost is
    measured again and speculation comes back."""
    p = DraftPolicy(PolicyConfig(gamma=4, probe_min=2, probe_max=4))
    for i in range(12):                                   # poisoned: steps with drafts cost +60 ms
        k = i % 2
        p.observe_step(1 + k, k, 0.030 + 0.002 * (1 + k) + 0.060 * k)
    probs = torch.full((1, 4), 0.8)
    assert p.decide(probs).lengths.sum() == 0
    drafted = []
    for _ in range(80):
        plan = p.plan(1)
        n = int(p.decide(probs[:, :plan.depth]).lengths.sum()) if plan.run_pass else 0
        drafted.append(n)
        p.observe_step(1 + n, n, 0.030 + 0.002 * (1 + n))   # the machine's real cost
    assert drafted[0] == 0
    assert sum(n > 0 for n in drafted[-10:]) >= 9     # one may re-time the no-draft step


def test_cost_model_slopes_never_negative_when_features_are_collinear():
    """A policy that only ever drafts one token: ``tokens`` and ``any_drafts`` are the same
    feature. The fit must not split one cost into a big per-token term and a negative
    fixed term (which priced 2+ token drafts far too high in a real engine)."""
    import random
    rnd = random.Random(0)
    m = CostModel(3, decay=0.999, slope_prior=[0.5, 0.0])
    for i in range(400):
        d = 1.0 if i % 25 == 0 else 0.0           # drafts on 4% of steps, one token each
        m.add([1.0, d, d], 0.024 + 0.009 * d + rnd.uniform(-0.004, 0.004))
    w = m.weights()
    assert float(w[1]) >= 0 and float(w[2]) >= 0, w
    one = m.predict([1.0, 1.0, 1.0]) - m.predict([1.0, 0.0, 0.0])
    assert 0.004 < one < 0.014, one                # the one-token draft's extra cost is kept
    assert m.predict([1.0, 4.0, 1.0]) - m.predict([1.0, 0.0, 0.0]) < 0.05


def feed_chain_costs(policy: DraftPolicy, per_step: float, per_token: float, reqs: int,
                     per_pass: float, steps: int = 40) -> None:
    """Chain streams: the draft pass runs once per stream, each costing ``per_pass``."""
    g = policy.cfg.gamma
    for i in range(steps):
        k = i % (g + 1)
        n = reqs + reqs * k
        passes = max(k, 1)
        draft = per_pass * passes
        policy.observe_step(n, reqs * k, per_step + per_token * n + draft, draft, reqs * passes,
                            passes)


def test_chain_draft_cost_is_per_pass():
    """One pass per stream: a depth-4 chain costs four passes, not one pass over 4 tokens."""
    p = DraftPolicy(PolicyConfig(gamma=4, sequential=True))
    feed_chain_costs(p, per_step=0.020, per_token=0.0005, reqs=1, per_pass=0.004)
    assert p.costs.draft_cost(1, 4) == pytest.approx(0.016, rel=0.1)
    assert p.costs.draft_cost(1, 1) == pytest.approx(0.004, rel=0.1)


def test_chain_stops_when_another_pass_cannot_pay():
    """After each pass the policy asks whether one more is worth it: not when every
    request's chain so far is unlikely, yes while one is likely."""
    p = DraftPolicy(PolicyConfig(gamma=4, sequential=True))
    feed_chain_costs(p, per_step=0.020, per_token=0.0005, reqs=2, per_pass=0.004)
    assert p.continue_chain(torch.tensor([[0.9, 0.9], [0.1, 0.1]]))
    assert not p.continue_chain(torch.tensor([[0.1, 0.1], [0.05, 0.2]]))
    # a pass that costs a whole step is never worth a likely-but-uncertain token
    q = DraftPolicy(PolicyConfig(gamma=4, sequential=True))
    feed_chain_costs(q, per_step=0.020, per_token=0.0005, reqs=2, per_pass=0.030)
    assert not q.continue_chain(torch.tensor([[0.9, 0.9], [0.9, 0.9]]))
    # fixed mode runs the whole chain
    f = DraftPolicy(PolicyConfig(gamma=4, mode="fixed", sequential=True))
    assert f.continue_chain(torch.tensor([[0.01, 0.01]]))


def test_drafting_that_measurably_pays_goes_on_where_the_profile_says_it_would_not():
    """Underconfident chain streams (raw top-1 probabilities below their acceptance): the
    running profile says two passes a step cannot pay, but the drafting steps of this batch
    size were 1.33x faster than steps without drafts, so the pass keeps running."""
    def policy():
        p = DraftPolicy(PolicyConfig(gamma=2, sequential=True))
        feed_chain_costs(p, per_step=0.045, per_token=0.0002, reqs=1, per_pass=0.012)
        for _ in range(10):
            p.decide(torch.tensor([[0.3, 0.33]]))                # profile ~0.3 / 0.1
        return p

    def regular_passes(p):
        plans = [p.plan(1) for _ in range(12)]
        return sum(pl.run_pass and not pl.probe for pl in plans)

    assert regular_passes(policy()) == 0
    p = policy()
    base = p.costs.cells.get(1, 1)
    for _ in range(6):
        p.observe_outcome(1, produced=2, seconds=base * 1.5)
    assert regular_passes(p) == 12
    # ... unless a cost scale says drafts cost more than measured (the tests' "costly" engine)
    c = DraftPolicy(PolicyConfig(gamma=2, sequential=True, cost_scale=1000.0))
    feed_chain_costs(c, per_step=0.045, per_token=0.0002, reqs=1, per_pass=0.012)
    for _ in range(10):
        c.decide(torch.tensor([[0.3, 0.33]]))
    for _ in range(6):
        c.observe_outcome(1, produced=2, seconds=c.costs.cells.get(1, 1) * 1.5)
    assert regular_passes(c) == 0
    # drafting steps that were slower keep it off
    q = policy()
    for _ in range(6):
        q.observe_outcome(1, produced=2, seconds=base * 2.5)
    assert regular_passes(q) == 0


def test_off_plan_is_reused_within_a_window_and_resolved_when_the_batch_changes():
    """Speculation off costs a plan per step; the same batch size re-solves it only every
    ``recheck_every`` steps, and a new batch size at once."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(p, per_step=0.002, per_token=0.010, reqs=8)
    probs = torch.full((8, 4), 0.6)
    p.decide(probs)                                       # the running profile exists
    solved = []
    best = p._best
    p._best = lambda *a, **k: solved.append(a[0]) or best(*a, **k)
    plans = [p.plan(8) for _ in range(16)]
    assert not any(pl.run_pass and not pl.probe for pl in plans)
    assert 1 <= len(solved) <= 16 // p.cfg.recheck_every + 1
    n = len(solved)
    p.plan(3)
    assert len(solved) == n + 1 and solved[-1] == 3


def test_measured_cells_outlast_a_slow_probe():
    """Speculation off for long stretches: steps with drafts are rare probes. What a cell
    measured stays until that cell is measured again, so one slow probe of a 1-token draft
    does not price every draft count, and the cheap counts measured earlier still draft."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    for _ in range(4):                              # measured: 3 tokens cost what 1 costs
        for n in (1, 3):
            p.observe_step(n, n - 1, 0.040)
    for _ in range(200):                            # a long stretch without drafts
        p.observe_step(1, 0, 0.040)
    p.observe_step(2, 1, 0.120)                     # one slow probe drafting one token
    p.observe_step(2, 1, 0.120)
    cost = p.costs.verify_cost(1, torch.arange(5, dtype=torch.float64))
    assert float(cost[2]) == pytest.approx(0.040, rel=0.05)       # the measured 3-token cell
    assert float(cost[1]) > 0.1
    assert p.decide(torch.tensor([[0.7, 0.7, 0.1, 0.1]])).lengths.tolist() == [2]


def test_cells_follow_a_curve_that_is_not_a_line():
    """vLLM-CPU's matmuls are slower for 2 rows than for 3 on some CPUs: the policy drafts
    2 tokens where 1 would cost more than 2, and never below the per-token floor."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    for _ in range(6):
        for n, t in ((1, 0.045), (2, 0.060), (3, 0.041), (5, 0.041)):
            p.observe_step(n, n - 1, t)
    cost = p.costs.verify_cost(1, torch.arange(5, dtype=torch.float64))
    assert float(cost[1]) == pytest.approx(0.060, rel=0.05)
    floor = p.costs.token_floor()                      # measured cheaper than none: floored
    assert float(cost[2]) == pytest.approx(0.045 + 2 * floor, rel=1e-3)
    assert float(cost[3]) == pytest.approx(0.045 + 3 * floor, rel=1e-3)   # interpolated
    probs = torch.tensor([[0.5, 0.5, 0.05, 0.05]])
    assert p.decide(probs).lengths.tolist() == [2]


def test_probes_cycle_through_draft_counts():
    """A probe drafts 1, 2, .. g tokens in turn, so every count's cost gets measured."""
    p = DraftPolicy(PolicyConfig(gamma=3, probe_min=1, probe_max=1))
    for _ in range(10):
        p.observe_step(1, 0, 0.030)
        p.observe_step(2, 1, 0.300)                # drafts look hopeless: off, probes only
    probs = torch.full((1, 3), 0.05)
    p.decide(probs)
    seen = []
    for _ in range(12):
        plan = p.plan(1)
        if plan.run_pass and plan.probe:
            seen.append(int(p.decide(probs).lengths.sum()))
    assert set(seen) == {1, 2, 3}, seen


def test_warmup_caps_a_large_batch_at_gamma_drafts():
    """Before costs are known a batch of 16 drafts only the gamma likeliest tokens in all
    (chain prefixes), not 16 x gamma; a single request still drafts every stream."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    assert p.plan(16).run_pass
    probs = torch.full((16, 4), 0.3)
    probs[3] = torch.tensor([0.9, 0.9, 0.2, 0.2])
    probs[7] = torch.tensor([0.8, 0.2, 0.2, 0.2])
    lengths = p.decide(probs).lengths
    assert int(lengths.sum()) == 4
    assert lengths[3] == 2 and lengths[7] == 1
    one = DraftPolicy(PolicyConfig(gamma=4))
    one.plan(1)
    assert one.decide(torch.full((1, 4), 0.3)).lengths.tolist() == [4]


def test_a_probe_that_pays_only_once_its_pass_is_sunk_does_not_bring_probes_back():
    """Batch 16, verification ~free per draft but a 20 ms stream pass: a probe's drafts beat
    no drafts once the pass has run, yet the step would have been faster without it, so the
    probe back-off keeps growing (no pass every 4 steps)."""
    p = DraftPolicy(PolicyConfig(gamma=4, probe_min=4, probe_max=64))
    for i in range(40):
        k = i % 5
        p.observe_step(16 + k, k, 0.070 + 0.0005 * k, 0.0, 0)
        p.observe_step(16, 0, 0.090, 0.020, 64, 1)
    probs = torch.full((16, 4), 0.3)
    passes = 0
    for _ in range(120):
        plan = p.plan(16)
        if plan.run_pass:
            passes += 1
            p.decide(probs[:, :plan.depth], 16)
    assert passes <= 6


def test_a_stale_no_draft_step_time_is_measured_again():
    """While speculation stays on, the step without drafts (the base every draft is priced
    against) is never timed: a slow early sample (80 ms where the truth is 40) made drafts
    look free and kept speculation on for good. The policy re-times it every
    ``refresh_every`` steps and, with the truth known, turns speculation off where it does
    not pay; the refreshes themselves stay rare."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    true = lambda m: 0.040 + 0.005 * m            # noqa: E731  (drafts cost 5 ms a token)
    for _ in range(8):                            # warm-up: the no-draft step looked slow
        p.observe_step(1, 0, 0.080)
        for m in (1, 2, 3, 4):
            p.observe_step(1 + m, m, true(m) + 0.001, 0.001, 4)
    probs = torch.full((1, 4), 0.15)              # gain 0.15 a token: does not pay 5 ms
    drafted = []
    for _ in range(300):
        plan = p.plan(1)
        m = int(p.decide(probs[:, :plan.depth]).lengths.sum()) if plan.run_pass else 0
        drafted.append(m)
        pas = 0.001 if plan.run_pass else 0.0
        p.observe_step(1 + m, m, true(m) + pas, pas, 4 if plan.run_pass else 0)
    assert sum(x > 0 for x in drafted[:60]) >= 50, drafted[:60]      # on while it looked slow
    assert 1 <= p.stats.anchor_refreshes <= 4
    assert p.costs.cells.get(1, 1) == pytest.approx(0.040, rel=0.1)
    assert sum(x > 0 for x in drafted[-100:]) <= 5, drafted[-100:]    # off once it is known


def test_realized_guard_margin_follows_what_drafting_steps_bought():
    from specstream_vllm.policy.guard import RealizedGuard
    g = RealizedGuard()
    for _ in range(12):     # batch 16: drafting steps 15% slower than steps without drafts
        g.observe(16, produced=18, seconds=0.100, base_seconds=0.082)
    assert g.margin(16) > 0.2 and g.margin(20) == g.margin(16)     # same bucket (16-31)
    assert g.margin(4) == 0.0                                      # another bucket: untouched
    for _ in range(40):     # then they pay (1.3x): the margin goes back to 0
        g.observe(16, produced=26, seconds=0.100, base_seconds=0.082)
    assert g.margin(16) == 0.0


def test_drafts_stop_where_drafting_steps_were_slower_and_go_on_elsewhere():
    """The cost model says drafts pay at batch 16 and batch 1; the steps that drafted at batch
    16 were slower than those without (the model was wrong there): batch 16 stops drafting,
    batch 1 does not."""
    p = DraftPolicy(PolicyConfig(gamma=4))
    feed_costs(p, per_step=0.030, per_token=0.001, reqs=16)
    feed_costs(p, per_step=0.030, per_token=0.001, reqs=1)
    probs16 = torch.full((16, 4), 0.9)
    probs1 = torch.full((1, 4), 0.9)
    assert int(p.decide(probs16).lengths.sum()) > 0 and int(p.decide(probs1).lengths.sum()) > 0
    base16 = p.costs.cells.get(16, 16)
    for _ in range(30):
        p.observe_outcome(16, produced=20, seconds=base16 * 1.5)
    assert int(p.decide(probs16).lengths.sum()) == 0
    assert int(p.decide(probs1).lengths.sum()) > 0
    assert p.summary()["realized"][-1]["margin"] > 0
    off = DraftPolicy(PolicyConfig(gamma=4, realized_guard=False))   # the switch
    feed_costs(off, per_step=0.030, per_token=0.001, reqs=16)
    for _ in range(30):
        off.observe_outcome(16, produced=20, seconds=off.costs.cells.get(16, 16) * 1.5)
    assert int(off.decide(probs16).lengths.sum()) > 0


def test_drafting_that_realizes_less_than_the_plans_bar_stops():
    """What a step's own time shows is not all that drafting costs (steps that also prefill,
    time between steps): a bucket whose drafting steps realize less than the gain the plan
    asked of them (8%) stops drafting, one that realizes more goes on."""
    def drafts_after(realized: float) -> int:
        p = DraftPolicy(PolicyConfig(gamma=4))
        feed_costs(p, per_step=0.030, per_token=0.001, reqs=16)
        base16 = p.costs.cells.get(16, 16)
        for _ in range(100):
            p.observe_outcome(16, produced=int(16 * realized * 10), seconds=base16 * 10)
        return int(p.decide(torch.full((16, 4), 0.9)).lengths.sum())

    assert drafts_after(1.05) == 0
    assert drafts_after(1.20) > 0


def test_realized_guard_is_on_unless_the_ablation_switch_says_otherwise(monkeypatch):
    from specstream_vllm.vllm_integration.config import resolve_policy
    assert resolve_policy({}).realized_guard is True
    monkeypatch.setenv("SPECSTREAM_POLICY_REALIZED_GUARD", "0")
    assert resolve_policy({}).realized_guard is False
    assert resolve_policy({}).match_budget is True           # budget.py: its own switch
    monkeypatch.setenv("SPECSTREAM_POLICY_MATCH_BUDGET", "0")
    assert resolve_policy({}).match_budget is False


def test_few_rows_calibration_counts_as_the_array_path(monkeypatch):
    """A small batch's acceptance is counted in plain Python; it must leave the same
    tables as the array path on the same observations (both sources, ragged drafts)."""
    from specstream_vllm.policy import calibration
    gen = torch.Generator().manual_seed(3)
    feeds = []
    for _ in range(40):
        R = int(torch.randint(1, 6, (1,), generator=gen))
        g = 4 if len(feeds) % 2 else 8
        probs = torch.rand(R, g, generator=gen, dtype=torch.float64)
        drafted = torch.randint(0, g + 1, (R,), generator=gen)
        accepted = torch.minimum(torch.randint(0, g + 1, (R,), generator=gen), drafted)
        feeds.append((probs, drafted, accepted, "streams" if g == 4 else "suffix"))
    tables = []
    for few in (8, 0):
        monkeypatch.setattr(calibration, "_FEW_ROWS", few)
        cal = calibration.Calibration(PolicyConfig(gamma=4))
        for probs, drafted, accepted, source in feeds:
            cal.observe(probs.tolist(), drafted.tolist(), accepted.tolist(), source)
        tables.append([getattr(c, t).copy() for c in (cal.streams, cal.sources["suffix"])
                       for t in ("n", "pred", "obs", "total_n", "total_pred", "total_obs")])
    assert tables[0][0].sum() > 0 and tables[0][6].sum() > 0
    for a, b in zip(*tables):
        assert (a == b).all()


def test_cost_model_solve_matches_a_least_squares_fit():
    """The fits' small solver against numpy's least squares on data with positive slopes."""
    import numpy as np
    rng = np.random.default_rng(0)
    m = CostModel(3, decay=1.0, slope_prior=[0.5, 0.0], ridge=0.0)
    xs, ys = [], []
    for _ in range(200):
        x = [1.0, float(rng.integers(1, 9)), float(rng.integers(0, 2))]
        y = 0.01 + 0.002 * x[1] + 0.003 * x[2] + 1e-5 * rng.standard_normal()
        m.add(x, y)
        xs.append(x)
        ys.append(y)
    ref = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)[0]
    assert np.allclose(m.weights(), ref, rtol=1e-6, atol=1e-9)
    assert m.predict([1.0, 4.0, 1.0]) == pytest.approx(float(ref @ [1.0, 4.0, 1.0]), rel=1e-6)


def test_best_count_few_slots_matches_the_array_form(monkeypatch):
    """A small batch's best draft count is found in plain Python; the array form must
    give the same count and rates (ties included: both keep the smaller count)."""
    import numpy as np
    from specstream_vllm.policy import selection
    rng = np.random.default_rng(5)
    cases = []
    for _ in range(300):
        n = int(rng.integers(0, 20))
        gains = -np.sort(-rng.random(n))
        gains[int(rng.integers(0, n + 1)):] = 0.0     # slots past a draft's end gain nothing
        curve = 0.02 + np.cumsum(rng.random(n + 1) * 0.003)
        if n >= 2 and rng.random() < 0.2:
            curve[2:] = curve[1]            # flat stretches: equal rates, ties
        draft = (np.arange(n + 1) > 0) * 0.004 if rng.random() < 0.5 else float(rng.random() * 0.004)
        cases.append((int(rng.integers(1, 5)), gains, curve, draft, float(rng.random() * 0.1)))
    results = []
    for few in (32, -1):
        monkeypatch.setattr(selection, "_FEW_SLOTS", few)
        results.append([selection.best_count(*c) for c in cases])
    assert results[0] == results[1]
    assert any(r[0] > 0 for r in results[0]) and any(r[0] == 0 for r in results[0])


def test_without_streams_the_match_drafts_and_no_pass_runs():
    """The ``nostreams`` ablation: no stream pass, ever, and the candidates still draft."""
    import numpy as np
    from specstream_vllm.policy import Candidates
    p = DraftPolicy(PolicyConfig(gamma=4, streams=False))
    drafted = looked = 0
    for step in range(200):
        p.observe_step(3, 2, 0.02, 0.0, 0, 1)
        cands = None
        if p.match_due(1):          # a match that pays keeps being looked for every step
            looked += 1
            cands = Candidates("suffix", np.array([[0.9, 0.8, 0.7, 0.0]]), np.array([3]))
            cands.chain = p.expected(cands)
        plan = p.plan(1, cands.chain if cands is not None else None)
        assert not plan.run_pass
        if cands is not None and plan.use_candidates:
            drafted += int(p.decide(None, 1, cands).lengths.sum())
    assert looked == 200 and drafted > 0 and p.stats.passes == 0
