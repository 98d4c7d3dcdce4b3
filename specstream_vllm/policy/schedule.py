"""When the stream pass runs, over how many streams, and the probes while it does not.

When the best plan is "off", the draft pass is skipped; a probe pass runs after 4, 8,
16 ... 64 skipped steps in a row so that acceptance statistics stay fresh and speculation
comes back when the batch shrinks or the streams become confident. Any pass restarts the
count: where the match source's drafts win some steps and the streams others, the passes
that run keep the statistics fresh, and a probe there would only pay for a pass whose
drafts lose to the match. A probe covers a few
requests and drafts 1, 2, .. g tokens in turn, so that the cost of every draft count
keeps being measured. Every ``refresh_every`` steps a batch size's step without drafts is
measured again: every draft is priced against it, and while speculation stays on it
would otherwise never be re-timed.
"""
from __future__ import annotations

from .config import PolicyConfig
from .decisions import Plan
from .stats import PolicyStats


class PassSchedule:
    def __init__(self, cfg: PolicyConfig, stats: PolicyStats):
        self.cfg, self.stats = cfg, stats
        self.skipped = 0                      # steps skipped since the last pass
        self.backoff = cfg.probe_min          # skipped steps before the next probe
        self.probing = False                  # the pass planned this step is a probe
        self.probe_cycle = 0                  # probes draft 1, 2, .. g tokens in turn
        self.empty_passes = 0                 # passes in a row whose choice was "no drafts"
        self.recent_max_k = cfg.gamma         # the longest stream draft lately
        self._passes_since_full = 0
        # batch size -> policy step it was first planned, or its last no-draft refresh
        self._anchor_asked: dict[int, int] = {}
        # (batch size, step // recheck_every) of the last "off" plan without candidates: the
        # same batch in the same window of steps is off again without re-solving the plan
        # (re-solving every step is most of what speculation costs while it is off)
        self._off_memo: tuple[int, int] | None = None

    def forced_off(self, ahead: int = 0) -> bool:
        start = self.cfg.force_off_from
        return start < self.stats.steps + ahead <= start + self.cfg.force_off_steps

    def skip(self) -> Plan:
        """No pass this step, or a probe when one is due."""
        self.skipped += 1
        if not self.forced_off() and self.skipped >= self.backoff:
            self.skipped = 0
            self.backoff = min(2 * self.backoff, self.cfg.probe_max)
            self.stats.probes += 1
            self.probing = True
            return Plan(True, self.cfg.gamma, probe=True, rows=self.cfg.probe_rows)
        self.stats.skipped_passes += 1
        return self.off_step()

    def off_step(self, use_candidates: bool = True) -> Plan:
        """No pass this step, counted as a step without speculation (unless another
        source drafts after all: see PolicyStats.count)."""
        self.stats.count_off()
        return Plan(False, 0, use_candidates=use_candidates)

    def remember_off(self, reqs: int) -> None:
        self._off_memo = (reqs, self.stats.steps // self.cfg.recheck_every)

    def off_remembered(self, reqs: int) -> bool:
        """Decided "off" for this batch size a few steps ago."""
        return self._off_memo == (reqs, self.stats.steps // self.cfg.recheck_every)

    def anchor_due(self, reqs: int, last_sample: int | None) -> bool:
        """Re-time this batch size's step without drafts? Due when its last sample
        (``last_sample``: the policy step, None if never) or the last attempt is
        ``refresh_every`` steps old: an early slow sample would otherwise make every draft
        look cheap for good."""
        step = self.stats.steps
        asked = self._anchor_asked.setdefault(reqs, step)
        last = last_sample if last_sample is not None else asked
        return step - max(asked, last) > self.cfg.refresh_every

    def refresh_anchor(self, reqs: int) -> Plan:
        self._anchor_asked[reqs] = self.stats.steps
        self.stats.anchor_refreshes += 1
        return self.off_step(use_candidates=False)

    def depth(self) -> int:
        """Streams the next pass runs: one more than lately drafted, all of them
        every ``full_depth_every`` passes (the deeper streams' statistics)."""
        g = self.cfg.gamma
        self._passes_since_full += 1
        if self._passes_since_full >= self.cfg.full_depth_every:
            self._passes_since_full = 0
            return g
        return max(1, min(g, self.recent_max_k + 1))

    def pass_ran(self) -> bool:
        """A pass ran this step: whether it was a probe."""
        self.stats.passes += 1
        self.skipped = 0
        probing, self.probing = self.probing, False
        return probing

    def judge_pass(self, streams_drafted: bool, earned: bool, probing: bool) -> None:
        """After the choice: a pass whose streams drafted resets the run of empty passes
        (and the probe backoff where it ``earned`` its cost); a non-probe pass that drafted
        nothing counts as empty (after 4 in a row the plan skips the pass)."""
        if streams_drafted and (earned or not probing):
            self.empty_passes = 0
            if earned:
                self.backoff = self.cfg.probe_min
        elif not probing:
            self.empty_passes += 1

    def next_probe_count(self, gamma: int) -> int:
        """Drafts of a probe that found nothing worth drafting: 1, 2, .. gamma in turn."""
        self.probe_cycle = self.probe_cycle % max(gamma, 1) + 1
        return self.probe_cycle

    def streams_drafted(self, k: int) -> None:
        """The longest stream draft this step was ``k`` (sets the next pass's depth)."""
        self.recent_max_k = max(k, int(0.9 * self.recent_max_k)) if k else max(
            0, self.recent_max_k - 1)
