"""Each runner step's measured cost, for the draft policy.

The runner patch starts a record when ``execute_model`` begins; the proposer reads the
previous step's record (its wall-clock period and the part spent drafting) and fills in
the current one's draft-pass figures and output size.
"""
from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass
class StepRecord:
    """One runner step: scheduled tokens (requests + drafts), wall-clock period from its
    ``execute_model`` to the next one (forward, sampling, bookkeeping, draft pass, and the
    engine core's own work between steps), the part of it spent in the draft pass."""

    start: float
    num_tokens: int
    num_draft_tokens: int
    num_reqs: int
    decode: bool                       # every request decoding (1 + its drafts tokens)
    period: float | None = None
    draft_seconds: float = 0.0
    draft_stream_tokens: int = 0
    draft_passes: int = 1              # chain streams: one pass per stream
    produced: int = 0                  # tokens the step emitted (set when its output arrives)
    matched: bool = False              # some of its drafts came from the match source
    draft_pass: str = ""               # anchor form: the pass its drafts rode ("fused", "separate")


class StepClock:
    def __init__(self):
        self.current: StepRecord | None = None
        self._finished: StepRecord | None = None

    def start(self, scheduler_output) -> None:
        n = int(scheduler_output.total_num_scheduled_tokens)
        if n <= 0:
            return
        now = time.perf_counter()
        drafts = sum(len(v) for v in scheduler_output.scheduled_spec_decode_tokens.values())
        reqs = len(scheduler_output.num_scheduled_tokens)
        rec = StepRecord(now, n, drafts, reqs, decode=(n == reqs + drafts))
        prev = self.current
        if prev is not None and prev.decode and rec.decode:
            prev.period = now - prev.start
            self._finished = prev   # back-to-back decode steps: no idle gap, no prefill
        else:
            self._finished = None
        self.current = rec

    def take_finished(self) -> StepRecord | None:
        """The previous step, once, if it and the current one are plain decode steps."""
        rec, self._finished = self._finished, None
        return rec
