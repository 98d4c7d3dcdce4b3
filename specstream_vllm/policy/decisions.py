"""What the proposer and the policy hand each other: another source's candidate drafts,
the plan before the stream pass, and the choice after it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the source name of the streams' own drafts
STREAMS = "streams"


@dataclass
class Candidates:
    """Another source's drafts for the same requests as the streams' rows: raw per-position
    confidence ``probs`` [R, w] (anything past a row's draft is ignored) and the draft
    lengths [R] (0: no draft for that request)."""

    source: str
    probs: np.ndarray           # float64 (a CPU tensor is accepted too)
    lengths: np.ndarray         # int64
    chain: np.ndarray | None = None      # :meth:`DraftPolicy.expected`, if already computed


@dataclass
class Choice:
    lengths: np.ndarray            # [R] int64: tokens each request drafts (0..g or 0..w)
    source: list                   # [R] STREAMS, the candidates' source, or None (nothing)


@dataclass
class Plan:
    run_pass: bool
    depth: int          # streams to run (0 when the pass is skipped)
    probe: bool = False
    use_candidates: bool = True     # False: no candidate can pay this step (drop them)
    # run the pass over at most this many requests (0: all). A probe measures what drafts
    # cost at this batch size and keeps acceptance fresh, and a few requests do both: over
    # all of them it costs a large share of a step at large batches
    rows: int = 0
