"""Which draft pass a step of the ``anchor`` form runs (``draft_pass: auto``).

Both passes draft the same tokens, so the choice is the step's cost alone: ``fused``
widens the verification forward's top layers by γ rows per verified position, ``separate``
reads those layers' weights a second time. Which costs less depends on the batch size (and
the machine), so each batch-size bucket (powers of two) keeps the measured seconds of a
decode step under each pass (a :class:`~.costs.CellCost` cell each); until both are
measured the bucket tries the one with fewer samples, then runs the cheaper one and
measures the other again when its figure is ``reprobe_after`` bucket steps old.
A pass's cell is keyed ``(bucket, -1 - pass index)``: no token count, so none of the
cell's rules for the no-draft base applies.
"""
from __future__ import annotations

from .costs import CellCost

PASSES = ("fused", "separate")


def _key(i: int) -> int:
    return -1 - i


def bucket(reqs: int) -> int:
    """The largest power of two <= ``reqs`` (1 for 0 or 1)."""
    return 1 << max(int(reqs), 1).bit_length() - 1


class PassChooser:
    def __init__(self, min_samples: int = 3, reprobe_after: int = 200):
        self.cells = CellCost(min_samples=min_samples)
        self.min_samples = min_samples
        self.reprobe_after = reprobe_after
        self._steps: dict[int, int] = {}    # bucket -> steps chosen there

    def choose(self, reqs: int) -> str:
        b = bucket(reqs)
        step = self._steps[b] = self._steps.get(b, 0) + 1
        secs = [self.cells.get(b, _key(i)) for i in range(len(PASSES))]
        if None in secs:       # not measured yet: the pass with fewer samples
            counts = [self._samples(b, i) for i in range(len(PASSES))]
            return PASSES[counts.index(min(counts))]
        best = secs.index(min(secs))
        other = 1 - best
        last = self.cells.last_sample(b, _key(other))
        if last is not None and step - last > self.reprobe_after:
            return PASSES[other]
        return PASSES[best]

    def observe(self, reqs: int, draft_pass: str, seconds: float) -> None:
        """One decode step's seconds under ``draft_pass`` at ``reqs`` requests."""
        if draft_pass not in PASSES or not seconds > 0:
            return
        b = bucket(reqs)
        self.cells.add(b, _key(PASSES.index(draft_pass)), seconds, self._steps.get(b, 0))

    def _samples(self, b: int, i: int) -> int:
        c = self.cells.cells.get(b, {}).get(_key(i))
        return int(c[2]) if c is not None else 0

    def table(self) -> list[dict]:
        """Per bucket: measured seconds per pass and the pass chosen now."""
        out = []
        for b in sorted(self.cells.cells):
            secs = {p: self.cells.get(b, _key(i)) for i, p in enumerate(PASSES)}
            known = {p: s for p, s in secs.items() if s is not None}
            out.append({"requests": b, "seconds": secs,
                        "cheaper": min(known, key=known.get) if len(known) == 2 else None})
        return out
