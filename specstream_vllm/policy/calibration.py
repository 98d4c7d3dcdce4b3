"""Calibration: how likely a draft token is accepted, learnt from what verification did.

The streams' raw top-1 probabilities and a match source's confidences are both corrected
online from the acceptance of their own drafts (one :class:`Calibrator` per source), so
the policy compares and prices both in calibrated chain probabilities: ``c_1 * ... * c_i``
for the i-th token of a draft, ``c_j`` the probability that position j is accepted given
positions < j were.
"""
from __future__ import annotations

import numpy as np

from .arrays import floats, ints, unit
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
        self.n = np.zeros((gamma, bins))
        self.pred = np.zeros((gamma, bins))
        self.obs = np.zeros((gamma, bins))
        # undecayed totals for the report
        self.total_n = np.zeros((gamma, bins), dtype=np.int64)
        self.total_pred = np.zeros((gamma, bins))
        self.total_obs = np.zeros((gamma, bins))

    def _bin(self, p: np.ndarray) -> np.ndarray:
        # the tolerance puts a float32 copy of a value in the same bin as the float64 one
        return np.minimum(np.maximum(p * self.bins + 1e-6, 0.0), self.bins - 1e-9).astype(np.int64)

    def _decay(self, n: int) -> None:
        k = float(self.decay) ** n
        for t in (self.n, self.pred, self.obs):
            t *= k

    def observe(self, pos, p, accepted) -> None:
        """pos (0-based), p, accepted: 1-D arrays of the tested positions."""
        pos, p, accepted = ints(pos), floats(p), floats(accepted)
        if pos.size == 0:
            return
        idx = pos * self.bins + self._bin(p)
        self._decay(pos.size)
        flat, shape = self.gamma * self.bins, self.n.shape
        count = np.bincount(idx, minlength=flat).reshape(shape)
        pred = np.bincount(idx, weights=p, minlength=flat).reshape(shape)
        obs = np.bincount(idx, weights=accepted, minlength=flat).reshape(shape)
        self.n += count
        self.pred += pred
        self.obs += obs
        self.total_n += count
        self.total_pred += pred
        self.total_obs += obs

    def observe_few(self, tested: list[tuple[int, float, bool]]) -> None:
        """:meth:`observe` of a few (position, p in [0, 1], accepted) in plain Python: at a
        small batch the array version's dozen numpy calls cost several times the
        arithmetic. Same sums in the same order, so the same tables."""
        if not tested:
            return
        self._decay(len(tested))
        per_bin: dict[tuple[int, int], list] = {}
        top = self.bins - 1e-9
        for j, p, hit in tested:
            key = (j, int(min(max(p * self.bins + 1e-6, 0.0), top)))
            c = per_bin.get(key)
            if c is None:
                per_bin[key] = [1, p, 1.0 if hit else 0.0]
            else:
                c[0] += 1
                c[1] += p
                c[2] += 1.0 if hit else 0.0
        for key, (count, pred, obs) in per_bin.items():
            self.n[key] += count
            self.pred[key] += pred
            self.obs[key] += obs
            self.total_n[key] += count
            self.total_pred[key] += pred
            self.total_obs[key] += obs

    def calibrate(self, p) -> np.ndarray:
        """p: [R, g] raw probabilities of positions 0..g-1 -> calibrated, same shape."""
        pd = unit(floats(p))
        b = self._bin(pd)
        rows = np.arange(pd.shape[1])[None, :]
        n, pred, obs = self.n[rows, b], self.pred[rows, b], self.obs[rows, b]
        pbar = np.where(n > 0, pred / np.maximum(n, 1e-9), pd)
        k = self.prior * np.maximum(pbar, 1e-3)
        return unit(pd * (obs + k) / (pred + k))

    def ratio_table(self) -> np.ndarray:
        """[gamma, bins] factors with ``calibrate(p) ~= p * ratio[j, bin(p)]``, for a device
        that applies them without a host round trip (an empty bin uses its centre as the
        mean raw probability where :meth:`calibrate` uses p itself)."""
        centre = (np.arange(self.bins) + 0.5) / self.bins
        pbar = np.where(self.n > 0, self.pred / np.maximum(self.n, 1e-9),
                        np.broadcast_to(centre, self.n.shape))
        k = self.prior * np.maximum(pbar, 1e-3)
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



#: up to this many requests' observations are counted in plain Python (observe_few)
_FEW_ROWS = 8


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

    def observe(self, probs, drafted, accepted, source: str = STREAMS) -> None:
        """probs [R, g] raw probabilities (or confidences) of last step's drafts of
        ``source`` (padding ignored), drafted [R] tokens verified, accepted [R] of them
        (lists, arrays or CPU tensors)."""
        if len(probs) <= _FEW_ROWS:
            rows = probs.tolist() if hasattr(probs, "tolist") else probs
            if not rows or not len(rows[0]):
                return
            g = len(rows[0])
            calib = self.streams if source == STREAMS else self.of(source, g)
            d = drafted.tolist() if hasattr(drafted, "tolist") else drafted
            a = accepted.tolist() if hasattr(accepted, "tolist") else accepted
            calib.observe_few([(j, min(max(float(row[j]), 0.0), 1.0), j < int(acc))
                               for row, dr, acc in zip(rows, d, a)
                               for j in range(min(int(dr), g, int(acc) + 1))])
            return
        probs = floats(probs)
        if probs.size == 0:
            return
        R, g = probs.shape
        calib = self.streams if source == STREAMS else self.of(source, g)
        j = np.arange(g)[None, :]
        d = np.minimum(ints(drafted)[:, None], g)
        a = ints(accepted)[:, None]
        tested = (j < d) & (j <= a)
        rows, pos = np.nonzero(tested)
        calib.observe(pos, unit(probs[rows, pos]), pos < a[rows, 0])

    def stream_chain(self, probs) -> np.ndarray:
        """Calibrated chain probabilities [R, g] of the streams' raw ``probs`` [R, g]."""
        return np.cumprod(self.streams.calibrate(probs), axis=1)

    def expected(self, cands: Candidates) -> np.ndarray:
        """Calibrated chain probabilities [R, w] of the candidates' drafts (0 past each)."""
        p = unit(floats(cands.probs))
        R, w = p.shape
        if w == 0 or R == 0:
            return np.zeros((R, w))
        cal = self.of(cands.source, w).calibrate(p)
        inside = np.arange(w)[None, :] < ints(cands.lengths)[:, None]
        return np.cumprod(cal * inside, axis=1)

    def summary(self) -> dict:
        return {"calibration": self.streams.per_position(),
                "calibration_table": self.streams.table(),
                "calibration_sources": {name: {"per_position": c.per_position(), "table": c.table()}
                                        for name, c in self.sources.items()}}
