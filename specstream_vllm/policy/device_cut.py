"""Per-request draft lengths decided on the device, from history alone.

On an accelerator the stream pass's probabilities stay on the device: reading them to
choose lengths on the host would stall every step until the pass finished. So the host
decides everything it can from what it already knows (whether to run the pass, over how
many streams: :meth:`DraftPolicy.plan`) and hands the device a cut made of last steps'
statistics (:func:`cut_inputs`): the calibration factors per position and probability
bin, and the expected accepted tokens a draft must bring to pay for its verification
(the cost model's threshold). The device keeps each request's prefix of drafts whose
calibrated chain probability clears it (:func:`device_lengths`). The probabilities come
back to the host one step later, with vLLM's own copy of the drafts, and feed the policy
then (:meth:`DraftPolicy.after_device_step`).

This is the per-slot form of the host's choice (``selection``): there the step's best
draft count is solved from this step's probabilities; here each slot is kept when its
expected gain beats its marginal verification cost, which is the same rule for a cost
that grows linearly with the drafts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class CutInputs:
    ratio: np.ndarray       # [g, bins] float64: calibrated ~= raw * ratio[position, bin]
    tau: float              # a kept slot's calibrated chain probability is at least this
    min_prob: float         # ... and its raw probability at least this
    cap: int                # at most this many drafts per request


def cut_inputs(policy, reqs: int, g: int) -> CutInputs:
    """The cut for a step of ``reqs`` requests over ``g`` streams, from the policy's state."""
    cfg = policy.cfg
    ratio = policy.calibration.streams.ratio_table()[:g]
    if cfg.mode == "fixed":
        return CutInputs(ratio, 0.0, cfg.min_draft_prob, g)
    if not policy.costs.ready:
        # warm-up: about gamma drafts in the whole step, as on the host (selection.warmup_cap)
        return CutInputs(ratio, 0.0, cfg.min_draft_prob, max(1, min(g, cfg.gamma // max(reqs, 1))))
    tau = policy.costs.threshold(reqs, policy.stats.steps) * (1.0 + cfg.decide_gain)
    return CutInputs(ratio, tau, cfg.min_draft_prob, g)


def device_lengths(probs: torch.Tensor, ratio: torch.Tensor, cut: CutInputs) -> torch.Tensor:
    """Draft lengths [R] for the streams' raw top-1 probabilities ``probs`` [R, g], on
    ``probs``' device (``ratio``: :attr:`CutInputs.ratio` as a tensor there). Tensor
    operations only: nothing here reads a value back."""
    R, g = probs.shape
    bins = ratio.shape[1]
    p = probs.double().clamp(0.0, 1.0)
    b = (p * bins + 1e-6).clamp(0.0, bins - 1e-9).to(torch.int64)
    j = torch.arange(g, device=probs.device).expand(R, g)
    chain = (p * ratio[j, b]).clamp(0.0, 1.0).cumprod(1)
    keep = (chain >= cut.tau) & (p >= cut.min_prob)
    return keep.to(torch.int64).cumprod(1).sum(1).clamp(max=cut.cap)
