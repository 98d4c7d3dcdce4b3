"""Realized-speed guard: what drafting really bought, per batch size, and the extra
predicted gain the policy asks of a draft where it bought less than its bar.

The policy predicts each step's speed-up from calibrated acceptance and measured step
costs; both are estimates, and when they are wrong in the costly direction (a draft-cost
cell measured on a busy machine, a source whose confidence drifts) the server is slower
for as long as the estimate stays wrong. So every step that verified drafts is checked
against the same batch size's step without drafts:

    realized = (tokens produced / step seconds) / (requests / no-draft step seconds)

with the step's whole wall time (verification, the next draft pass, lookups). Per batch
size bucket (1, 2-3, 4-7, ...), a running mean of that ratio drives an integral
controller: below ``target`` the bucket's margin grows, above it the margin shrinks to 0;
the policy adds the margin to the gain a plan must predict. A bad estimate therefore
costs a few steps, not the run; where drafts pay, the margin stays 0 and nothing changes.

The policy sets ``target`` to its own plan's bar (1 + ``min_gain``): a step's own time
misses part of what drafting costs (steps that also prefill are not measured, nor
anything between steps), so a bar at break-even lets a server run slower than without
speculation."""
from __future__ import annotations


def bucket(reqs: int) -> int:
    """1, 2-3, 4-7, 8-15, ...: neighbouring batch sizes share what they learnt (a draining
    batch visits each size for a few steps only)."""
    return max(int(reqs), 1).bit_length()


class RealizedGuard:
    def __init__(self, target: float = 1.02, decay: float = 0.8, rate: float = 0.5,
                 max_margin: float = 1.0, min_samples: int = 4):
        self.target, self.decay, self.rate = target, decay, rate
        self.max_margin, self.min_samples = max_margin, min_samples
        # bucket -> [time weight, time-weighted sum of ratios, steps seen, margin]
        self._b: dict[int, list[float]] = {}

    def observe(self, reqs: int, produced: int, seconds: float, base_seconds: float) -> None:
        """A step that verified drafts: ``produced`` tokens for ``reqs`` requests in
        ``seconds``; ``base_seconds``: the measured step of this batch size without drafts."""
        if reqs <= 0 or seconds <= 0 or base_seconds <= 0:
            return
        ratio = (produced / seconds) / (reqs / base_seconds)
        ratio = min(max(ratio, 0.25), 4.0)      # one stalled step must not decide a bucket
        s = self._b.setdefault(bucket(reqs), [0.0, 0.0, 0, 0.0])
        # weighted by the step's time: the mean is the ratio of throughputs, not of steps
        w = seconds / base_seconds
        s[0] = s[0] * self.decay + w
        s[1] = s[1] * self.decay + w * ratio
        s[2] += 1
        if s[2] >= self.min_samples:
            s[3] = min(max(s[3] + self.rate * (self.target - s[1] / s[0]), 0.0), self.max_margin)

    def paying(self, reqs: int, bar: float) -> bool:
        """This bucket's drafting steps realized at least ``bar`` (e.g. 1.08x) of its steps
        without drafts, over enough of them, with no margin raised."""
        s = self._b.get(bucket(reqs))
        return s is not None and s[2] >= self.min_samples and s[3] == 0.0 \
            and s[1] / s[0] >= bar

    def margin(self, reqs: int) -> float:
        s = self._b.get(bucket(reqs))
        return s[3] if s is not None else 0.0

    def table(self) -> list[dict]:
        return [{"requests": f"{1 << (b - 1)}-{(1 << b) - 1}", "steps": int(s[2]),
                 "realized": s[1] / s[0], "margin": s[3]} for b, s in sorted(self._b.items())]
