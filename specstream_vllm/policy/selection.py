"""The arithmetic of a step's choice: which drafted slots, how many, for whom.

With R requests decoding and m draft tokens in total, a step costs ``V(R + m) + D``
(verification of R + m tokens, the draft pass) and yields ``R + G_m`` tokens in
expectation, ``G_m`` the sum of the m drafted slots' calibrated chain probabilities.
Every slot costs the same verification time, so the best m slots are the m likeliest
(:func:`ranked`), and the best m is the one with the most tokens per second
(:func:`best_count`); chains fall along a row, so a row's chosen slots are a prefix
(:func:`lengths_of`).
"""
from __future__ import annotations

import numpy as np

from .decisions import STREAMS, Choice


def best_count(reqs: int, gains_sorted: np.ndarray, verify_curve: np.ndarray,
               draft_costs: np.ndarray | float, min_gain: float) -> tuple[int, float, float]:
    """(best number of drafts m, its tokens/s, tokens/s with m = 0) of a step of ``reqs``
    requests whose m likeliest slots gain ``gains_sorted[:m]`` tokens, verified in
    ``verify_curve[m]`` seconds, with draft passes of ``draft_costs[m]`` seconds (a float:
    the same for every m, a pass already paid). m = 0 unless the best beats it by
    ``min_gain``."""
    if len(gains_sorted) <= _FEW_SLOTS:
        # a small batch's few slots in plain Python: the same running sums and quotients
        # as the array form below, at a fraction of its numpy calls
        costs = verify_curve.tolist()
        if isinstance(draft_costs, np.ndarray) and draft_costs.ndim:
            costs = [c + d for c, d in zip(costs, draft_costs.tolist())]
        elif draft_costs:
            costs = [c + float(draft_costs) for c in costs]
        base = reqs / costs[0]
        best, best_rate, total = 0, base, 0.0
        for m, (gain, cost) in enumerate(zip(gains_sorted.tolist(), costs[1:]), 1):
            total += gain
            rate = (reqs + total) / cost
            if rate > best_rate:
                best, best_rate = m, rate
    else:
        tokens = np.empty(len(gains_sorted) + 1)
        tokens[0] = 0.0
        np.cumsum(gains_sorted, out=tokens[1:])
        rate = (reqs + tokens) / (verify_curve + draft_costs)
        base = float(rate[0])
        best = int(np.argmax(rate))
        best_rate = float(rate[best])
    if best_rate < (1.0 + min_gain) * base:
        best, best_rate = 0, base
    return best, best_rate, base


#: up to this many slots, :func:`best_count` runs in plain Python
_FEW_SLOTS = 32


def descending(x: np.ndarray) -> np.ndarray:
    """``x`` flattened, largest first."""
    return -np.sort(-x.reshape(-1))


def ranked(chain: np.ndarray, have: np.ndarray) -> np.ndarray:
    """Flat indices into ``chain`` [R, W] of the slots that exist (position < ``have``
    per row), likeliest first (ties: the earlier slot first). Only tokens that exist can
    be drafted: the measured cost curve is not monotonic on every CPU (verifying 3 tokens
    can be faster than 1), so zero-gain slots past a match's end, or of a request without
    a match, could otherwise look worth taking."""
    R, W = chain.shape
    exists = (np.arange(W)[None, :] < have[:, None]).reshape(-1)
    flat = np.where(exists, chain.reshape(-1), -1.0)
    return np.argsort(-flat, kind="stable")[:int(exists.sum())]


def lengths_of(order: np.ndarray, m: int, R: int, W: int) -> np.ndarray:
    """Per-request draft lengths when the first ``m`` slots of ``order`` are drafted
    (chains fall along a row, so a row's chosen slots are a prefix)."""
    out = np.zeros(R * W, dtype=np.int64)
    out[order[:m]] = 1
    return out.reshape(R, W).sum(1)


def labelled(lengths: np.ndarray, take: np.ndarray | None, source: str | None) -> Choice:
    """The choice with each request's source: ``source`` where ``take`` says the
    candidate won, the streams elsewhere, None where nothing is drafted."""
    taken = take.tolist() if take is not None else None
    names = [None if n == 0 else source if taken is not None and taken[k] else STREAMS
             for k, n in enumerate(lengths.tolist())]
    return Choice(lengths, names)


def warmup_cap(chain: np.ndarray, lengths: np.ndarray, gamma: int) -> np.ndarray:
    """Before costs are known: at most ``gamma`` drafts in the whole step, the likeliest.
    A large batch drafting every stream would verify many times its tokens while the
    policy learns that drafts do not pay there; capped, those steps still measure a cost
    with drafts, and batch 1 drafts as uncapped."""
    R, g = chain.shape
    if R * g <= gamma:
        return lengths
    return lengths_of(ranked(chain, lengths), gamma, R, g)
