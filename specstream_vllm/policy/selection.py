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

import torch

from .decisions import STREAMS, Choice


def best_count(reqs: int, gains_sorted: torch.Tensor, verify_curve: torch.Tensor,
               draft_costs: torch.Tensor | float, min_gain: float) -> tuple[int, float, float]:
    """(best number of drafts m, its tokens/s, tokens/s with m = 0) of a step of ``reqs``
    requests whose m likeliest slots gain ``gains_sorted[:m]`` tokens, verified in
    ``verify_curve[m]`` seconds, with draft passes of ``draft_costs[m]`` seconds (a float:
    the same for every m, a pass already paid). m = 0 unless the best beats it by
    ``min_gain``."""
    gains = gains_sorted.cumsum(0)
    tokens = reqs + torch.cat([torch.zeros(1, dtype=torch.float64), gains])
    rate = tokens / (verify_curve + draft_costs)
    base = float(rate[0])
    best = int(torch.argmax(rate))
    if rate[best] < (1.0 + min_gain) * base:
        best = 0
    return best, float(rate[best]), base


def ranked(chain: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
    """Flat indices into ``chain`` [R, W] of the slots that exist (position < ``have``
    per row), likeliest first. Only tokens that exist can be drafted: the measured cost
    curve is not monotonic on every CPU (verifying 3 tokens can be faster than 1), so
    zero-gain slots past a match's end, or of a request without a match, could otherwise
    look worth taking."""
    R, W = chain.shape
    exists = (torch.arange(W)[None, :] < have[:, None]).reshape(-1)
    flat = torch.where(exists, chain.reshape(-1).double(),
                       torch.full((R * W,), -1.0, dtype=torch.float64))
    return torch.argsort(flat, descending=True)[:int(exists.sum())]


def lengths_of(order: torch.Tensor, m: int, R: int, W: int) -> torch.Tensor:
    """Per-request draft lengths when the first ``m`` slots of ``order`` are drafted
    (chains fall along a row, so a row's chosen slots are a prefix)."""
    out = torch.zeros(R * W, dtype=torch.int64)
    out[order[:m]] = 1
    return out.view(R, W).sum(1)


def labelled(lengths: torch.Tensor, take: torch.Tensor | None, source: str | None) -> Choice:
    """The choice with each request's source: ``source`` where ``take`` says the
    candidate won, the streams elsewhere, None where nothing is drafted."""
    names = []
    for k, n in enumerate(lengths.tolist()):
        if n == 0:
            names.append(None)
        else:
            names.append(source if take is not None and bool(take[k]) else STREAMS)
    return Choice(lengths, names)


def warmup_cap(chain: torch.Tensor, lengths: torch.Tensor, gamma: int) -> torch.Tensor:
    """Before costs are known: at most ``gamma`` drafts in the whole step, the likeliest.
    A large batch drafting every stream would verify many times its tokens while the
    policy learns that drafts do not pay there; capped, those steps still measure a cost
    with drafts, and batch 1 drafts as uncapped."""
    R, g = chain.shape
    if R * g <= gamma:
        return lengths
    return lengths_of(ranked(chain, lengths), gamma, R, g)
