"""Is a finished request's slot taken by another (a server, a queue), or does the batch
only shrink (an offline batch draining)? The answer sets what an accepted draft is worth.

The draft policy prices a step by tokens per second. That is the right price while every
slot a request frees is taken by another: a token accepted now is a token nobody has to
compute later, worth ``T(R) / R`` of step time. In a batch that only drains (``LLM.generate``
over as many prompts as fit at once: nothing waits), the run lasts as many steps as its
longest request, and a token accepted for any other request only lets that request leave
the batch a step sooner, which saves the step's per-request part ``s`` (the fitted
verification cost of one more token), not ``T(R) / R``. Measured (SmolLM2, one EPYC core,
ShareGPT, 16 prompts at once, 96 tokens each): drafting produced 1.25 tokens per step, but
the run took 93 steps against 95 without drafts, 0.94x of no speculation where the
throughput price promised a gain.

:class:`Turnover` tells the two apart from the request ids of each step: a request that
leaves while others keep running is *replaced* if a new request joins within ``window``
steps. A decayed mean over leaves, starting at "replaced" (the price as it was, so a
server, batch 1 and any run too short to tell are unchanged), gives ``replaced``. A leave
that empties the batch says nothing (batch 1, or a run ending) and is not counted.

Opt-in (``SPECSTREAM_POLICY_DRAIN_VALUE=1``; PolicyConfig.drain_value). Measured on ShareGPT
(one EPYC core, 4 rounds, `docs/benchmarks/drain2-s17/`) it was slower at batch 4 (0.95x
against 1.04x pricing every token as in a server) and no faster at 16 (0.97x against 1.01x):
the price ``s`` assumes the request drafted for is not its run's longest, but drafts spread
over all requests speed up the longest one too, which in expectation (each request equally
likely the longest) gives back the server's price. Pricing each request by how likely it is
to be the longest (its remaining ``max_tokens``) is the refinement it would need."""
from __future__ import annotations

from collections import deque


class Turnover:
    def __init__(self, window: int = 8, decay: float = 0.8, prior_weight: float = 2.0):
        self.window, self.decay = window, decay
        self._weight = prior_weight
        self._sum = prior_weight            # prior: every leave replaced
        self._ids: set = set()
        self._open: deque[int] = deque()    # steps of leaves no join has answered yet
        self._step = 0
        self.leaves = 0
        self.last = (0, 0)

    def observe(self, req_ids) -> None:
        """The requests of this step (their ids, in any order)."""
        ids = set(req_ids)
        self._step += 1
        while self._open and self._step - self._open[0] > self.window:
            self._open.popleft()
            self._record(0.0)
        stayed = ids & self._ids
        joins = len(ids) - len(stayed)
        self.last = (joins, len(self._ids) - len(stayed))    # joins, leaves
        if self._ids and not stayed:
            # the batch ran empty: leaves no join answered while it ran were not replaced
            # (the next run's requests must not answer them: rounds of an offline batch)
            while self._open:
                self._open.popleft()
                self._record(0.0)
        else:           # a leave counts only while others keep running
            for _ in range(len(self._ids) - len(stayed)):
                self._open.append(self._step)
        for _ in range(min(joins, len(self._open))):
            self._open.popleft()
            self._record(1.0)
        self._ids = ids

    def _record(self, replaced: float) -> None:
        self.leaves += 1
        self._weight = self._weight * self.decay + 1.0
        self._sum = self._sum * self.decay + replaced

    @property
    def replaced(self) -> float:
        """Share of recent leaves whose slot another request took (1: a server or a queue,
        0: a batch draining)."""
        return self._sum / self._weight

    def summary(self) -> dict:
        return {"replaced": self.replaced, "leaves": self.leaves}
