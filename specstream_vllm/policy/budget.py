"""Match-draft budget: whether looking for matches pays at a batch size, i.e. the seconds
the lookups cost against the seconds the match drafts saved.

The policy prices each match draft before verifying it, but not the search that found it
(feeding the suffix trees, the lookup, calibrating the candidates, a larger plan). At large
batches that search can cost more every step than the few match drafts that pay save.

So per batch-size bucket (1, 2-3, 4-7, ...; see guard.bucket) two exponentially decayed
sums (per step, ~50-step memory) are kept:

* ``spent``: seconds of every lookup;
* ``saved``: for every step whose drafts came (in part) from matches,
  ``produced * base / reqs - seconds`` -- the time the step without drafts would have
  taken to emit as many tokens, minus the time the step took (``base``: the policy's
  no-draft step time for that batch size).

After ``min_lookups`` lookups in a bucket, ``saved < spent`` pauses lookups there: one
probe lookup after 8, 16, ... 128 steps, whose drafts (if any) are counted as before.
Lookups resume as soon as ``saved >= spent`` again: a stretch of text that repeats
itself pays for its lookups within a probe or two."""
from __future__ import annotations

from .guard import bucket


class MatchBudget:
    def __init__(self, decay: float = 0.98, min_lookups: int = 24, pause_min: int = 8,
                 pause_max: int = 128):
        self.decay, self.min_lookups = decay, min_lookups
        self.pause_min, self.pause_max = pause_min, pause_max
        # bucket -> [spent s, saved s, step of last update, lookups since the last change,
        #            pause length (0: looking up every step it is asked), next probe step]
        self._b: dict[int, list[float]] = {}

    def _state(self, reqs: int, step: int) -> list[float]:
        s = self._b.setdefault(bucket(reqs), [0.0, 0.0, step, 0, 0, 0])
        k = self.decay ** max(step - s[2], 0)
        s[0] *= k
        s[1] *= k
        s[2] = step
        return s

    def spent(self, reqs: int, seconds: float, step: int) -> None:
        """A lookup over ``reqs`` requests took ``seconds`` at policy step ``step``."""
        if reqs <= 0 or seconds <= 0:
            return
        s = self._state(reqs, step)
        s[0] += seconds
        s[3] += 1
        if s[4]:                                     # a probe while paused: next one later
            s[4] = min(2 * s[4], self.pause_max)
            s[5] = step + s[4]
        self._judge(s, step)

    def saved(self, reqs: int, produced: int, seconds: float, base_seconds: float,
              step: int) -> None:
        """A step that verified match drafts: ``produced`` tokens for ``reqs`` requests in
        ``seconds``; ``base_seconds``: this batch size's step without drafts."""
        if reqs <= 0 or seconds <= 0 or base_seconds <= 0:
            return
        s = self._state(reqs, step)
        gain = produced * base_seconds / reqs - seconds
        s[1] += min(max(gain, -base_seconds), 8 * base_seconds)   # one stalled step is one step
        self._judge(s, step)

    def _judge(self, s: list[float], step: int) -> None:
        if s[4]:
            if s[1] >= s[0]:                         # paying again: look up every step
                s[3], s[4] = 0, 0
        elif s[3] >= self.min_lookups and s[1] < s[0]:
            s[3], s[4], s[5] = 0, self.pause_min, step + self.pause_min

    def due(self, reqs: int, step: int) -> bool:
        """False while this bucket's lookups are paused, except at its probe steps."""
        s = self._b.get(bucket(reqs))
        return s is None or not s[4] or step >= s[5]

    def table(self) -> list[dict]:
        return [{"requests": f"{1 << (b - 1)}-{(1 << b) - 1}", "spent_s": s[0], "saved_s": s[1],
                 "paused_for": int(s[4])} for b, s in sorted(self._b.items())]
