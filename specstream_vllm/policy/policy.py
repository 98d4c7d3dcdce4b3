"""The per-request draft choice: how many tokens each request drafts this step, and from
which source.

The proposer feeds :class:`DraftPolicy` what it sees (the streams' top-1 probabilities,
another source's candidate drafts, how many drafts were accepted, how long steps took) and
asks it every step:

* :meth:`DraftPolicy.plan` (before the draft pass): run the stream pass at all, and over
  how many streams? Skipping it saves the pass's own cost when speculation cannot pay.
* :meth:`DraftPolicy.decide` (after it): each request's draft, its source and length.

The objective is tokens per second of the whole step (selection.py), priced with the
measured step costs (costs.py) and calibrated acceptance (calibration.py). Before the pass
its cost counts; after it, the pass is paid and drafts only have to pay for their
verification. Per request the draft worth more is taken, the sum over positions of
``chain - tau``, ``tau`` the gain a drafted token must bring to pay for its verification.
Where drafting steps realized less than planned the bar rises (guard.py); lookups pause
where they cost more than their drafts saved (budget.py). ``mode="fixed"``: every stream,
chain cut at the first probability below ``min_draft_prob``; a request takes the
candidate when its calibrated expected accepted tokens exceed those of its cut chain.
"""
from __future__ import annotations

import math

import numpy as np

from . import selection
from .arrays import floats, ints, known, repeated, widened
from .budget import MatchBudget
from .calibration import Calibration, Calibrator
from .config import PolicyConfig
from .costs import CostModel, StepCosts
from .decisions import STREAMS, Candidates, Choice, Plan
from .guard import RealizedGuard
from .schedule import PassSchedule
from .stats import PolicyStats


class DraftPolicy:
    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.stats = PolicyStats()
        self.costs = StepCosts(cfg)
        self.calibration = Calibration(cfg)
        self.schedule = PassSchedule(cfg, self.stats)
        self.guard = RealizedGuard(target=1.0 + cfg.min_gain)
        self.budget = MatchBudget()
        # mean chain product per position over requests (from passes): the "running
        # acceptance" that decides whether a pass is worth running at all
        self.profile = np.full(cfg.gamma, np.nan)
        self._match_paid_at: dict[int, int] = {}     # batch size -> last step a match could pay

    # the proposer's reports read these
    @property
    def calib(self) -> Calibrator:
        return self.calibration.streams

    @property
    def verify(self) -> CostModel:
        return self.costs.verify

    @property
    def draft(self) -> CostModel:
        return self.costs.draft

    # ---------------------------------------------------------------- observations
    def observe_step(self, num_tokens: int, num_draft_tokens: int, seconds: float,
                     draft_seconds: float = 0.0, draft_stream_tokens: int = 0,
                     draft_passes: int = 1) -> None:
        """One finished decode step: ``num_tokens`` verified (requests + drafts) in
        ``seconds`` of wall time, of which ``draft_seconds`` were the draft pass(es) over
        ``draft_stream_tokens`` stream tokens in ``draft_passes`` passes."""
        self.costs.observe(num_tokens, num_draft_tokens, seconds, draft_seconds,
                           draft_stream_tokens, draft_passes, self.stats.steps)

    def observe_outcome(self, reqs: int, produced: int, seconds: float,
                        matched: bool = False) -> None:
        """A finished step that verified drafts: ``produced`` tokens emitted for ``reqs``
        requests in ``seconds`` of wall time (all of it). Checked against this batch
        size's step without drafts (:class:`RealizedGuard`); ``matched``: some of the drafts
        came from the match source, whose lookups this step helps pay for (:class:`MatchBudget`)."""
        base = self.costs.base(reqs)
        if self.cfg.realized_guard and base is not None:
            self.guard.observe(reqs, produced, seconds, base)
        if matched and self.cfg.match_budget and self.costs.ready:
            self.budget.saved(reqs, produced, seconds, float(self.costs.curve(reqs, 0)[0]),
                              self.stats.steps)

    def observe_lookup(self, reqs: int, seconds: float) -> None:
        """The match source's lookup this step (feeding, lookup, calibration) took ``seconds``."""
        if self.cfg.match_budget and self.cfg.mode == "auto" and self.costs.ready:
            self.budget.spent(reqs, seconds, self.stats.steps)

    def observe_acceptance(self, probs, drafted, accepted, source: str = STREAMS) -> None:
        """probs [R, g] raw stream probabilities (or ``source``'s raw confidences) of last
        step's drafts (padding ignored), drafted [R] tokens verified, accepted [R] of them
        accepted."""
        self.calibration.observe(probs, drafted, accepted, source)

    def expected(self, cands: Candidates) -> np.ndarray:
        """Calibrated chain probabilities [R, w] of the candidates' drafts (0 past each)."""
        return self.calibration.expected(cands)

    # ---------------------------------------------------------------- pricing
    def _best(self, reqs: int, gains_sorted: np.ndarray, draft_costs: np.ndarray | float,
              min_gain: float) -> tuple[int, float, float]:
        """:func:`selection.best_count` on this batch size's measured costs. ``min_gain``:
        before the pass the loss is asymmetric (a wrong "on" makes the server slower, a wrong
        "off" only forgoes a gain) and step times on a busy machine are noisy; after it
        (pass paid) a small margin only absorbs the noise. Where this batch size's drafting
        steps realized less than the plan's bar, the bar is higher (:class:`RealizedGuard`)."""
        return selection.best_count(reqs, gains_sorted, self.costs.curve(reqs, gains_sorted.size),
                                    draft_costs, min_gain + self.guard.margin(reqs))

    # ---------------------------------------------------------------- before the pass
    def plan(self, num_reqs: int, candidates: np.ndarray | None = None) -> Plan:
        """Before the draft pass: run it (over how many streams) or not. ``candidates``:
        the calibrated chains [num_reqs, w] of another source's drafts (:meth:`expected`),
        if any: requests they serve better need no streams, and they draft without a pass."""
        cfg, sched = self.cfg, self.schedule
        self.stats.counted_off = False
        if num_reqs <= 0:
            return Plan(False, 0)
        self.stats.steps += 1
        self.stats.request_steps += num_reqs
        if cfg.mode == "fixed" and cfg.streams:
            return Plan(True, cfg.gamma)
        if sched.forced_off():
            return sched.skip()
        if cfg.streams and (not self.costs.ready or math.isnan(self.profile[0])):
            return Plan(True, cfg.gamma)
        if sched.anchor_due(num_reqs, self.costs.cells.last_sample(num_reqs, num_reqs)):
            return sched.refresh_anchor(num_reqs)
        if candidates is not None:
            candidates = floats(candidates)
        use_cands = candidates is not None and candidates.size > 0 and bool(
            (candidates[:, 0] > self.costs.threshold(num_reqs, self.stats.steps)).any())
        if use_cands:
            self._match_paid_at[num_reqs] = self.stats.steps
        if not cfg.streams:
            return sched.off_step(use_candidates=use_cands or cfg.mode == "fixed")
        # a candidate whose first token cannot pay for its verification is worth nothing
        # (chains only fall): with none left this is the streams-only plan, memo included
        plan = self._plan_streams(num_reqs, candidates if use_cands else None)
        plan.use_candidates = use_cands
        return plan

    def match_due(self, num_reqs: int) -> bool:
        """Look for matches this step? Always while costs are unknown, in fixed mode, at
        small batches (up to ``always_match_reqs`` requests: a lookup there costs well under
        1% of a step, and skipping them missed matches for good once none had paid for a
        while), and for a batch size where a match could pay in the last
        ``2 * recheck_every`` steps; elsewhere every ``recheck_every`` steps: at large
        batches a match rarely pays for its verification, and a repetitive stretch that
        does pay lasts longer than a few steps. Where lookups have cost more than their
        drafts saved, they pause (:class:`MatchBudget`)."""
        cfg = self.cfg
        if self.schedule.forced_off(ahead=1):     # asked before plan() counts the step
            return False
        if cfg.mode == "fixed" or not self.costs.ready:
            return True
        step = self.stats.steps
        if cfg.match_budget and not self.budget.due(num_reqs, step):
            return False
        if num_reqs <= cfg.always_match_reqs:
            return True
        last = self._match_paid_at.get(num_reqs)
        return (last is not None and step - last <= 2 * cfg.recheck_every) \
            or step % cfg.recheck_every == 0

    def _plan_streams(self, num_reqs: int, cand: np.ndarray | None) -> Plan:
        cfg, sched = self.cfg, self.schedule
        no_cands = cand is None
        if no_cands and sched.off_remembered(num_reqs):
            return sched.skip()
        depth = sched.depth()
        # average-request estimate: every request drafts the same k of the running profile
        prof = np.minimum(known(self.profile[:depth]) * cfg.optimism, 1.0)
        if no_cands:
            gains = selection.descending(repeated(prof, num_reqs))
            best, _, _ = self._best(num_reqs, gains, self.costs.plan_draft_costs(
                num_reqs, gains.size, depth), cfg.min_gain)
            # the profile is an estimate; what drafting steps of this batch size really bought
            # is a measurement: where they beat steps without drafts by the plan's own bar,
            # keep drafting (underconfident streams). Not under a cost_scale above 1: it says
            # drafts cost more than measured, which no measurement overrules
            paying = best > 0 or (cfg.realized_guard and cfg.cost_scale <= 1.0
                                  and self.guard.paying(num_reqs, 1.0 + cfg.min_gain))
            if paying and sched.empty_passes < 4:
                return Plan(True, depth)
            sched.remember_off(num_reqs)
            return sched.skip()
        tau = self.costs.threshold(num_reqs, self.stats.steps)
        streams_win = np.maximum(cand - tau, 0.0).sum(1) < np.maximum(prof - tau, 0.0).sum()
        n_streams = int(streams_win.sum())
        # no request would rather have the streams, or four passes in a row drafted nothing
        if n_streams == 0 or sched.empty_passes >= 4:
            return sched.skip()
        with_pass = np.concatenate([repeated(prof, n_streams), cand[~streams_win].reshape(-1)])
        best, rate, _ = self._best(num_reqs, selection.descending(with_pass),
                                   self.costs.plan_draft_costs(num_reqs, with_pass.size, depth),
                                   cfg.min_gain)
        flat_cand = selection.descending(cand)
        _, rate_without, _ = self._best(num_reqs, flat_cand, 0.0, cfg.min_gain)
        if best > 0 and rate > rate_without:
            return Plan(True, depth)
        return sched.skip()

    def continue_chain(self, probs, num_reqs: int | None = None) -> bool:
        """Chain streams, after pass j (``probs`` [R, j] raw top-1 probabilities so far): is
        one more pass worth its cost? The step's best tokens per second with the drafts at
        hand (passes so far paid) against the same with one more pass, whose drafts are
        expected at each request's calibrated chain times the running conditional
        acceptance of position j+1 (1 while unknown). Fixed mode, auto before costs are
        known, and probes (they measure every depth) always continue."""
        if self.cfg.mode == "fixed" or not self.costs.ready or self.schedule.probing:
            return True
        probs = floats(probs)
        R, j = probs.shape
        reqs = R if num_reqs is None else num_reqs
        chain = self.calibration.stream_chain(probs)                    # [R, j]
        q = 1.0
        if j < self.profile.size:
            prev, cur = float(self.profile[j - 1]), float(self.profile[j])
            if math.isfinite(prev) and math.isfinite(cur) and prev > 0:
                q = min(1.0, cur / prev * self.cfg.optimism)
        spent = self.costs.draft_cost(R, j)
        now = selection.descending(chain)
        more = selection.descending(np.concatenate([chain.reshape(-1), chain[:, -1] * q]))
        _, rate_now, _ = self._best(reqs, now, spent, 0.0)
        _, rate_more, _ = self._best(reqs, more, spent + self.costs.draft_cost(R, 1), 0.0)
        return rate_more > rate_now

    # ---------------------------------------------------------------- after the pass
    def decide(self, probs, num_reqs: int | None = None,
               candidates: Candidates | None = None) -> Choice:
        """Each request's draft: its source and length. ``probs`` [R, g]: the streams'
        raw top-1 probabilities (None when the stream pass did not run this step);
        ``candidates``: another source's drafts for the same R requests; ``num_reqs``:
        requests decoding this step (R unless told)."""
        ran = probs is not None
        if ran:
            probs = floats(probs)
        R = probs.shape[0] if ran else candidates.probs.shape[0] if candidates is not None else 0
        reqs = R if num_reqs is None else num_reqs
        probing = self.schedule.pass_ran() if ran else False
        if R == 0:
            return self.stats.count(Choice(np.zeros(0, dtype=np.int64), []))
        cand_chain = None
        if candidates is not None:
            cand_chain = floats(candidates.chain) if candidates.chain is not None \
                else self.expected(candidates)
        chain = self.calibration.stream_chain(probs) if ran else None      # [R, g]
        if self.cfg.mode == "fixed" or not self.costs.ready:
            return self.stats.count(self._decide_by_cut(probs, chain, R, candidates, cand_chain))
        if ran:
            self._update_profile(chain)
        if self.schedule.forced_off():
            return self.stats.count(Choice(np.zeros(R, dtype=np.int64), [None] * R))
        return self.stats.count(self._decide_by_rate(probs, chain, R, reqs, candidates,
                                                     cand_chain, probing))

    def _decide_by_cut(self, probs, chain, R, candidates, cand_chain) -> Choice:
        """Fixed mode, and auto while costs are unknown: every stream up to the
        ``min_draft_prob`` cut (auto: at most gamma drafts in the step); the candidate where
        it has more calibrated expected accepted tokens."""
        ran = probs is not None
        g = probs.shape[1] if ran else 0
        if ran and self.cfg.min_draft_prob > 0:
            lengths = np.cumprod(probs >= self.cfg.min_draft_prob, axis=1, dtype=np.int64).sum(1)
        else:
            lengths = np.full(R, g, dtype=np.int64)
        if ran and self.cfg.mode == "auto":
            self._update_profile(chain)
            lengths = selection.warmup_cap(chain, lengths, self.cfg.gamma)
        if cand_chain is None:
            return selection.labelled(lengths, None, None)
        own = (chain * (np.arange(g)[None, :] < lengths[:, None])).sum(1) if ran \
            else np.zeros(R)
        take = cand_chain.sum(1) > own
        lengths = np.where(take, ints(candidates.lengths), lengths)
        return selection.labelled(lengths, take, candidates.source)

    def _decide_by_rate(self, probs, chain, R, reqs, candidates, cand_chain, probing) -> Choice:
        """Auto mode: per request the draft worth more, then the step's best draft count."""
        cfg = self.cfg
        ran = probs is not None
        g = probs.shape[1] if ran else 0
        if cand_chain is None:
            take, best_chain = None, chain
            have = np.full(R, g, dtype=np.int64)
        else:
            tau = self.costs.threshold(reqs, self.stats.steps)
            worth = lambda c: np.maximum(c - tau, 0.0).sum(1)  # noqa: E731
            own = worth(chain) if ran else np.full(R, -1.0)
            take = worth(cand_chain) > own
            w = max(g, cand_chain.shape[1])
            best_chain = widened(cand_chain, w) if not ran else np.where(
                take[:, None], widened(cand_chain, w), widened(chain, w))
            have = np.where(take, np.minimum(ints(candidates.lengths), w), g)
        W = best_chain.shape[1]
        order = selection.ranked(best_chain, have)
        # the pass (if any) is paid: drafts only have to pay for their verification
        spent = self.costs.draft_cost(R, g) if ran else 0.0
        best, rate, _ = self._best(reqs, best_chain.reshape(-1)[order], spent, cfg.decide_gain)
        lengths = selection.lengths_of(order, best, R, W)
        if ran:
            # did the streams earn drafts on their own (a probe's forced token does not count)?
            stream_lengths = lengths if take is None else np.where(take, 0, lengths)
            # the pass earned its keep only if the step beats no speculation with the pass
            # counted: once it has run its cost is sunk and drafts always look worth it, and
            # a probe that "paid" on those terms would bring the next probe back too soon
            without = reqs / float(self.costs.curve(reqs, 0)[0])
            if cand_chain is not None:      # ... and beats what the matches do without it
                without = max(without, self._best(reqs, selection.descending(cand_chain),
                                                  0.0, 0.0)[1])
            earned = rate >= (1.0 + cfg.min_gain) * without
            self.schedule.judge_pass(int(stream_lengths.sum()) > 0, earned, probing)
        if probing and best == 0:
            # a probe drafts 1, 2, .. g of the likeliest tokens in turn: the cost of steps
            # with drafts must keep being measured (every count: the curve is no line), or
            # one slow early step could keep speculation off
            m = self.schedule.next_probe_count(g)
            lengths = selection.lengths_of(order, min(m, order.size), R, W)
        if ran:
            stream_lengths = lengths if take is None else np.where(take, 0, lengths)
            self.schedule.streams_drafted(int(stream_lengths.max()))
        return selection.labelled(lengths, take, candidates.source if candidates else None)

    # ---------------------------------------------------------------- device path
    def take_candidates(self, reqs: int, cand_chain, lengths, with_pass: bool) -> list[int]:
        """Before a pass whose probabilities stay on the device (``device_cut``): per request,
        how many of the candidate's tokens it proposes (0: none, the streams draft). A
        candidate is taken where its calibrated chain beats the verification threshold by
        more than the streams' running profile does (by anything, without a pass), up to
        its last token that still clears the threshold."""
        tau = self.costs.threshold(reqs, self.stats.steps)
        cand_chain = floats(cand_chain)
        w = cand_chain.shape[1]
        inside = np.arange(w)[None, :] < ints(lengths)[:, None]
        keep = np.cumprod((cand_chain >= tau) & inside, axis=1, dtype=np.int64).sum(1)
        worth = np.maximum(cand_chain - tau, 0.0).sum(1)
        if with_pass:
            prof = known(self.profile[:w])
            taken = worth > np.maximum(prof - tau, 0.0).sum()
        else:
            taken = worth > 0
        return np.where(taken, keep, 0).tolist()

    def begin_device_pass(self) -> bool:
        """A pass whose drafts are cut on the device runs this step: whether it is a probe."""
        return self.schedule.pass_ran()

    def after_device_step(self, reqs: int, probs, lengths, probing: bool, others=None,
                          other_source: str | None = None) -> Choice:
        """A device-cut step, read back one step later: ``probs`` [R, g] of the requests the
        pass ran for and the ``lengths`` [R] the device kept; ``others`` [R'] the lengths of
        the requests that proposed ``other_source``'s drafts. Updates what :meth:`decide`
        updates on the host: profile, the pass's judgement, next depth, counters."""
        probs, lengths = floats(probs), ints(lengths)
        R, g = probs.shape
        drafted = int(lengths.sum())
        if R and self.cfg.mode == "auto":
            chain = self.calibration.stream_chain(probs)
            self._update_profile(chain)
            earned = True
            if self.costs.ready:
                curve = self.costs.curve(reqs, drafted)
                kept = (chain * (np.arange(g)[None, :] < lengths[:, None])).sum()
                rate = (reqs + float(kept)) / (float(curve[drafted]) + self.costs.draft_cost(R, g))
                earned = rate >= (1.0 + self.cfg.min_gain) * reqs / float(curve[0])
            self.schedule.judge_pass(drafted > 0, earned, probing)
        if R:
            self.schedule.streams_drafted(int(lengths.max()))
        names = [STREAMS if n else None for n in lengths.tolist()]
        if others is not None:
            lengths = np.concatenate([lengths, ints(others)])
            names += [other_source if n else None for n in others.tolist()]
        return self.stats.count(Choice(lengths, names))

    def _update_profile(self, chain: np.ndarray) -> None:
        g = chain.shape[1]
        mean = chain.mean(0)
        cur = self.profile[:g]
        self.profile[:g] = np.where(np.isnan(cur), mean, 0.9 * cur + 0.1 * mean)

    # ---------------------------------------------------------------- reporting
    def summary(self) -> dict:
        return {"mode": self.cfg.mode, **self.stats.as_dict(), **self.costs.summary(),
                "profile": [None if math.isnan(x) else x for x in self.profile.tolist()],
                "realized": self.guard.table(), "match_budget": self.budget.table(),
                **self.calibration.summary()}
