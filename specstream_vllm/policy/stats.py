"""The policy's counters (reports, the policy dump) and how a step is counted."""
from __future__ import annotations

from dataclasses import dataclass, field

from .decisions import Choice


@dataclass
class PolicyStats:
    steps: int = 0                      # decode steps seen by plan()
    steps_without_speculation: int = 0  # of which no request drafted anything
    draft_tokens: int = 0
    request_steps: int = 0              # sum over steps of decoding requests
    passes: int = 0
    probes: int = 0
    skipped_passes: int = 0
    anchor_refreshes: int = 0           # steps kept without drafts to re-time that step
    drafts_by_source: dict = field(default_factory=dict)   # request drafts taken per source
    # plan() skipped the pass and counted this step as without speculation already
    counted_off: bool = field(default=False, repr=False)

    def count_off(self) -> None:
        """A step planned without a pass: without speculation unless another source drafts
        after all (:meth:`count`)."""
        self.counted_off = True
        self.steps_without_speculation += 1

    def count(self, choice: Choice) -> Choice:
        """The step's choice: draft tokens, drafts per source, and the step counted without
        speculation exactly once when nothing was drafted."""
        total = int(choice.lengths.sum())
        self.draft_tokens += total
        if self.counted_off:
            if total > 0:               # another source drafted after all
                self.steps_without_speculation -= 1
        elif total == 0:
            self.steps_without_speculation += 1
        self.counted_off = False
        for name in choice.source:
            if name is not None:
                self.drafts_by_source[name] = self.drafts_by_source.get(name, 0) + 1
        return choice

    def as_dict(self) -> dict:
        return {"steps": self.steps, "steps_without_speculation": self.steps_without_speculation,
                "draft_tokens": self.draft_tokens, "request_steps": self.request_steps,
                "mean_draft_tokens_per_step": self.draft_tokens / self.steps if self.steps else 0.0,
                "mean_draft_tokens_per_request_step":
                    self.draft_tokens / self.request_steps if self.request_steps else 0.0,
                "passes": self.passes, "probes": self.probes, "skipped_passes": self.skipped_passes,
                "anchor_refreshes": self.anchor_refreshes,
                "drafts_by_source": dict(self.drafts_by_source)}
