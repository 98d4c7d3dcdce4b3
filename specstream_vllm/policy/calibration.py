"""Calibration: how likely a draft token is accepted, learnt from what verification did.

The streams' raw top-1 probabilities and a match source's confidences are both corrected
online from the acceptance of their own drafts (one :class:`Calibrator` per source), so
the policy compares and prices both in calibrated chain probabilities: ``c_1 * ... * c_i``
for the i-th token of a draft, ``c_j`` the probability that position j is accepted given
positions < j were.
"""
from __future__ import annotations

import torch

from .config import PolicyConfig
from .decisions import STREAMS, Candidates


class Calibrator:
    """Per stream position and probability bin: predicted vs observed acceptance.

    An observation is (position j, the stream's raw top-1 probability p, accepted or
    not), made only for positions that verification actually tested (all earlier
    drafts accepted). The calibrated probability of p in bin b of position j is
    ``p * (obs_b + k * pbar_b) / (pred_b + k * pbar_b)``: the raw probability scaled by
    the bin's observed/predicted ratio, shrunk towards 1 by ``k`` pseudo-observations.
    """

    def __init__(self, gamma: int, bins: int, prior: float, decay: float):
        self.gamma, self.bins, self.prior, self.decay = gamma, bins, prior, decay
        self.n = torch.zeros(gamma, bins, dtype=torch.float64)
        self.pred = torch.zeros(gamma, bins, dtype=torch.float64)
        self.obs = torch.zeros(gamma, bins, dtype=torch.float64)
        # undecayed totals for the report
        self.total_n = torch.zeros(gamma, bins, dtype=torch.int64)
        self.total_pred = torch.zeros(gamma, bins, dtype=torch.float64)
        self.total_obs = torch.zeros(gamma, bins, dtype=torch.float64)

    def _bin(self, p: torch.Tensor) -> torch.Tensor:
        # the tolerance puts a float32 copy of a value in the same bin as the float64 one
        return (p.double() * self.bins + 1e-6).clamp(0.0, self.bins - 1e-9).to(torch.int64)

    def observe(self, pos: torch.Tensor, p: torch.Tensor, accepted: torch.Tensor) -> None:
        """pos (0-based), p, accepted: 1-D tensors of the tested positions."""
        if pos.numel() == 0:
            return
        idx = pos.to(torch.int64) * self.bins + self._bin(p.double())
        k = float(self.decay) ** pos.numel()
        for t in (self.n, self.pred, self.obs):
            t.mul_(k)
        flat = self.gamma * self.bins
        ones = torch.ones_like(p, dtype=torch.float64)
        self.n.view(-1).add_(torch.bincount(idx, ones, flat))
        self.pred.view(-1).add_(torch.bincount(idx, p.double(), flat))
        self.obs.view(-1).add_(torch.bincount(idx, accepted.double(), flat))
        self.total_n.view(-1).add_(torch.bincount(idx, minlength=flat))
        self.total_pred.view(-1).add_(torch.bincount(idx, p.double(), flat))
        self.total_obs.view(-1).add_(torch.bincount(idx, accepted.double(), flat))

    def calibrate(self, p: torch.Tensor) -> torch.Tensor:
        """p: [R, g] raw probabilities of positions 0..g-1 -> calibrated, same shape."""
        g = p.shape[1]
        pd = p.double().clamp(0.0, 1.0)
        b = self._bin(pd)
        rows = torch.arange(g).expand_as(b)
        n, pred, obs = self.n[rows, b], self.pred[rows, b], self.obs[rows, b]
        pbar = torch.where(n > 0, pred / n.clamp(min=1e-9), pd)
        k = self.prior * pbar.clamp(min=1e-3)
        return (pd * (obs + k) / (pred + k)).clamp(0.0, 1.0)

    def ratio_table(self) -> torch.Tensor:
        """[gamma, bins] factors with ``calibrate(p) ~= p * ratio[j, bin(p)]``, for a device
        that applies them without a host round trip (an empty bin uses its centre as the
        mean raw probability where :meth:`calibrate` uses p itself)."""
        centre = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins
        pbar = torch.where(self.n > 0, self.pred / self.n.clamp(min=1e-9), centre.expand_as(self.n))
        k = self.prior * pbar.clamp(min=1e-3)
        return (self.obs + k) / (self.pred + k)

    def table(self) -> list[dict]:
        """Undecayed predicted vs observed acceptance per position and bin (for reports)."""
        out = []
        for j in range(self.gamma):
            for b in range(self.bins):
                n = int(self.total_n[j, b])
                if n:
                    out.append({"position": j + 1, "bin": [b / self.bins, (b + 1) / self.bins],
                                "n": n, "predicted": float(self.total_pred[j, b]) / n,
                                "observed": float(self.total_obs[j, b]) / n})
        return out

    def per_position(self) -> list[dict]:
        out = []
        for j in range(self.gamma):
            n = int(self.total_n[j].sum())
            out.append({"position": j + 1, "n": n,
                        "predicted": float(self.total_pred[j].sum()) / n if n else None,
                        "observed": float(self.total_obs[j].sum()) / n if n else None})
        return out



class Calibration:
    """One :class:`Calibrator` for the streams and one per other source (created when the
    source first drafts, widened when its drafts grow longer)."""

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self.streams = Calibrator(cfg.gamma, cfg.calib_bins, cfg.calib_prior, cfg.calib_decay)
        self.sources: dict[str, Calibrator] = {}

    def of(self, source: str, width: int) -> Calibrator:
        """The calibrator of a non-stream ``source`` whose drafts are ``width`` tokens wide."""
        c = self.sources.get(source)
        if c is None or c.gamma < width:
            cfg = self.cfg
            c = self.sources[source] = Calibrator(width, cfg.calib_bins, cfg.calib_prior,
                                                  cfg.calib_decay)
        return c

    def observe(self, probs: torch.Tensor, drafted: torch.Tensor, accepted: torch.Tensor,
                source: str = STREAMS) -> None:
        """probs [R, g] raw probabilities (or confidences) of last step's drafts of
        ``source`` (padding ignored), drafted [R] tokens verified, accepted [R] of them."""
        if probs.numel() == 0:
            return
        R, g = probs.shape
        calib = self.streams if source == STREAMS else self.of(source, g)
        j = torch.arange(g).expand(R, g)
        d = drafted.to(torch.int64)[:, None].clamp(max=g)
        a = accepted.to(torch.int64)[:, None]
        tested = (j < d) & (j <= a)
        calib.observe(j[tested], probs[tested].clamp(0.0, 1.0), (j < a)[tested])

    def stream_chain(self, probs: torch.Tensor) -> torch.Tensor:
        """Calibrated chain probabilities [R, g] of the streams' raw ``probs`` [R, g]."""
        return self.streams.calibrate(probs).cumprod(1)

    def expected(self, cands: Candidates) -> torch.Tensor:
        """Calibrated chain probabilities [R, w] of the candidates' drafts (0 past each)."""
        p = cands.probs.double().clamp(0.0, 1.0)
        R, w = p.shape
        if w == 0 or R == 0:
            return torch.zeros(R, w, dtype=torch.float64)
        cal = self.of(cands.source, w).calibrate(p)
        inside = torch.arange(w)[None, :] < cands.lengths.to(torch.int64)[:, None]
        return (cal * inside).cumprod(1)

    def summary(self) -> dict:
        return {"calibration": self.streams.per_position(),
                "calibration_table": self.streams.table(),
                "calibration_sources": {name: {"per_position": c.per_position(), "table": c.table()}
                                        for name, c in self.sources.items()}}
