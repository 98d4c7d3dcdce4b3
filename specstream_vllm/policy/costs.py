"""Measured step costs: what verifying a step's tokens and running the draft pass take.

The policy prices every draft against these. Verification is known two ways: per batch
size and token count where the runner measured it (:class:`CellCost`: the curve is not a
line on every CPU), and as a linear fit of all step times elsewhere (:class:`CostModel`),
as is the draft pass. :class:`StepCosts` combines them into the questions the policy asks:
seconds of a step with ``m`` drafts, of a draft pass, of one more verified token.
"""
from __future__ import annotations

import math

import numpy as np

from .arrays import floats
from .config import PolicyConfig


class CostModel:
    """Exponentially weighted ridge least squares ``y = w . x`` on a few features.

    Verification: ``x = [1, tokens, any_drafts]`` (the last one catches the fixed cost
    of the rejection-sampler path). Draft pass: ``x = [1, stream tokens]`` per pass (chain
    streams run one pass per stream). The ridge
    pulls the coefficients after the intercept towards a prior that is a fraction of
    the observed mean (``slope_prior``), so a slope is defined even while the batch
    never changes; once the features vary, the data decide. Samples far from the
    current prediction (a busy machine, a compile) are clipped to 0.5x-2x of it, and the
    first ``skip_first`` samples are dropped.
    """

    def __init__(self, n_features: int, decay: float, slope_prior: list[float],
                 ridge: float = 0.02, skip_first: int = 0):
        if not 1 <= n_features <= 3:
            raise ValueError(f"a cost fit has 1 to 3 features, got {n_features}")
        self.n, self.decay, self.ridge = n_features, decay, ridge
        self.skip_first = skip_first          # first calls: compilation, cold caches
        self.slope_prior = slope_prior        # per feature after the intercept: fraction of y/x
        # sums kept as Python floats: add() runs every step, and array ops on 3x3 matrices
        # cost more than the arithmetic; arrays only in weights()
        self._xtx = [[0.0] * n_features for _ in range(n_features)]
        self._xty = [0.0] * n_features
        self.sw = 0.0
        self.sy = 0.0
        self.count = 0
        self._w: np.ndarray | None = None
        self._w_list: list[float] = []            # the same weights, for scalar use
        self._w_stale: list[float] | None = None   # last solved weights, for clipping

    def add(self, x: list[float], y: float) -> None:
        if not (y > 0 and math.isfinite(y)):
            return
        if self.skip_first > 0:
            self.skip_first -= 1
            return
        if self._w is not None:
            self._w_stale = self._w_list
        if self.count >= 4:
            # clip against the last solved fit (a few samples old at most when nobody asked
            # for a new one): re-solving on every sample cost more than the step's decision
            if self._w_stale is None or self.count % 16 == 0:
                self.weights()
                self._w_stale = self._w_list
            w = self._w_stale
            pred = sum(wi * xi for wi, xi in zip(w, x))
            if pred > 0:
                y = min(max(y, 0.5 * pred), 2.0 * pred)
        d = self.decay
        for i, xi in enumerate(x):
            row = self._xtx[i]
            for j, xj in enumerate(x):
                row[j] = row[j] * d + xi * xj
            self._xty[i] = self._xty[i] * d + xi * y
        self.sw = self.sw * self.decay + 1.0
        self.sy = self.sy * self.decay + y
        self.count += 1
        self._w = None

    def weights(self) -> np.ndarray:
        if self._w is None:
            w = [0.0] * self.n
            if self.sw > 0:
                # plain Python: on a 2x2 or 3x3 system numpy's calls cost ~8x the arithmetic
                a = [row[:] for row in self._xtx]
                b = self._xty[:]
                mean_y = self.sy / self.sw
                for i in range(1, self.n):
                    mean_x = a[0][i] / self.sw         # x[0] == 1: first row holds sums of x
                    scale = max(mean_x, 1e-6)
                    lam = self.ridge * self.sw * scale * scale
                    a[i][i] += lam
                    b[i] += lam * self.slope_prior[i - 1] * mean_y / max(mean_x, 1.0)
                a[0][0] += 1e-9
                w = _solve_nonnegative_slopes(a, b)
            self._w, self._w_list = np.array(w), w
        return self._w

    def predict(self, x: list[float]) -> float:
        self.weights()
        return sum(wi * xi for wi, xi in zip(self._w_list, x))

    @property
    def ready(self) -> bool:
        return self.count > 0


def _det(m: list[list[float]]) -> float:
    """Determinant of the fits' 1x1 to 3x3 systems (a fit has at most three features)."""
    if len(m) == 3:
        (a, b, c), (d, e, f), (g, h, i) = m
        return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return m[0][0]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """``a w = b`` for the fits' two or three unknowns, by Cramer's rule (the ridge keeps
    ``a`` away from singular)."""
    d = _det(a)
    if d == 0.0:
        return [0.0] * len(b)
    return [_det([row[:c] + [bi] + row[c + 1:] for row, bi in zip(a, b)]) / d
            for c in range(len(b))]


def _solve_nonnegative_slopes(a: list[list[float]], b: list[float]) -> list[float]:
    """``a w = b`` with every slope after the intercept >= 0: a cost never falls with
    more work. Collinear features (a policy that only ever drafts one token makes
    ``tokens`` and ``any_drafts`` equal) otherwise split one cost into a large positive
    and a negative term, which mis-prices the drafts the data never showed."""
    free = list(range(len(b)))
    while True:
        sub = _solve([[a[i][j] for j in free] for i in free], [b[i] for i in free])
        w = [0.0] * len(b)
        for i, v in zip(free, sub):
            w[i] = v
        neg = [i for i in free[1:] if w[i] < 0]
        if not neg:
            return w
        free.remove(min(neg, key=lambda i: w[i]))


class CellCost:
    """Measured verification seconds per (requests, tokens) cell: an exponentially weighted
    mean per cell that decays only with the cell's own samples.

    The linear fit (:class:`CostModel`) forgets in steps, and while speculation is off the
    steps with drafts are rare probes: a single slow probe would set the per-token slope
    for good and keep speculation off. A cell keeps what it measured until that cell is
    measured again, and it follows the runner's real curve, which is not a line (CPU matmul
    kernels can take a slower path for 1-2 rows than for 3+, so verifying 3 tokens can be
    faster than verifying 2)."""

    def __init__(self, decay: float = 0.8, min_samples: int = 2, stale_after: int = 64,
                 stale_keep: float = 0.05):
        self.decay, self.min_samples = decay, min_samples
        self.stale_after, self.stale_keep = stale_after, stale_keep
        # requests -> tokens -> [weight, weighted sum, n, step of the last sample]
        self.cells: dict[int, dict[int, list[float]]] = {}

    def add(self, reqs: int, tokens: int, seconds: float, step: int = 0) -> None:
        """One sample at policy step ``step``. The no-draft cell (``tokens == reqs``: the
        base every draft is priced against), last measured more than ``stale_after`` steps
        ago, keeps only ``stale_keep`` of its history's weight: the machine's load has moved
        on since, and a few early samples (a warm-up, a busy neighbour) must not outweigh
        the first fresh one. Draft cells keep theirs (a lone slow probe must not reprice
        a count measured well before)."""
        c = self.cells.setdefault(reqs, {}).setdefault(tokens, [0.0, 0.0, 0, step])
        if c[2] and tokens == reqs and step - c[3] > self.stale_after:
            c[0] *= self.stale_keep
            c[1] *= self.stale_keep
        elif c[2] >= 3:   # a busy machine, a compile: clipped to 0.5x-2x of the cell's mean
            mean = c[1] / c[0]
            seconds = min(max(seconds, 0.5 * mean), 2.0 * mean)
        c[0] = c[0] * self.decay + 1.0
        c[1] = c[1] * self.decay + seconds
        c[2] += 1
        c[3] = step

    def last_sample(self, reqs: int, tokens: int) -> int | None:
        """Policy step of the cell's last sample (None: never measured)."""
        c = self.cells.get(reqs, {}).get(tokens)
        return int(c[3]) if c is not None else None

    def _mean(self, c: list[float] | None) -> float | None:
        return c[1] / c[0] if c is not None and c[2] >= self.min_samples else None

    def get(self, reqs: int, tokens: int) -> float | None:
        return self._mean(self.cells.get(reqs, {}).get(tokens))

    def known_drafts(self, reqs: int) -> list[tuple[int, float]]:
        """(drafts m, seconds) of the measured cells of this batch size, m ascending."""
        out = [(t - reqs, self._mean(c)) for t, c in self.cells.get(reqs, {}).items() if t > reqs]
        return sorted((m, v) for m, v in out if v is not None)

    def table(self) -> list[dict]:
        return [{"requests": r, "tokens": t, "seconds": c[1] / c[0], "samples": int(c[2])}
                for r, row in sorted(self.cells.items()) for t, c in sorted(row.items())]

def _interpolate(m: np.ndarray, known: list[tuple[int, float]], anchor: float,
                 token: float) -> np.ndarray:
    """Extra seconds of m drafts from the measured cells ``known`` [(drafts, seconds)] over
    the no-draft ``anchor``: linear between measured counts, the fitted per-token ``token``
    past the last one."""
    xs = np.array([0.0] + [float(k) for k, _ in known])
    ys = np.array([0.0] + [v - anchor for _, v in known])
    flat = m.reshape(-1)
    inside = np.minimum(flat, xs[-1])
    hi = np.minimum(np.searchsorted(xs, inside), xs.size - 1)
    lo = np.maximum(hi - 1, 0)
    x0, x1, y0, y1 = xs[lo], xs[hi], ys[lo], ys[hi]
    t = np.where(x1 > x0, (inside - x0) / np.maximum(x1 - x0, 1e-9), 0.0)
    out = y0 + t * (y1 - y0) + token * np.maximum(flat - xs[-1], 0.0)
    return out.reshape(m.shape)


class StepCosts:
    """Seconds of the steps the policy weighs: verification of ``reqs`` requests with ``m``
    drafts, the draft pass, one more verified token; learnt from the finished steps."""

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        # verification seconds ~ a + b * tokens + c * [any drafts]; priors: b = half the
        # mean cost per token, c = 0
        self.verify = CostModel(3, cfg.cost_decay, slope_prior=[0.5, 0.0], skip_first=3)
        # draft pass seconds ~ d0 + d1 * stream tokens (prior: the per-token part dominates)
        self.draft = CostModel(2, cfg.cost_decay, slope_prior=[0.8], skip_first=3)
        self.cells = CellCost(stale_after=cfg.refresh_every)
        self._curve_memo: tuple[tuple, np.ndarray] | None = None        # see curve()
        self._tau_memo: tuple[tuple[int, int], float] | None = None      # see threshold()

    def observe(self, num_tokens: int, num_draft_tokens: int, seconds: float, draft_seconds: float,
                draft_stream_tokens: int, draft_passes: int, step: int) -> None:
        """One finished decode step at policy step ``step`` (see DraftPolicy.observe_step)."""
        verify_s = seconds - draft_seconds
        if verify_s > 0:
            self.verify.add([1.0, float(num_tokens), 1.0 if num_draft_tokens else 0.0], verify_s)
            if self.verify.count > 0:       # past the fit's skipped first samples (compiles)
                self.cells.add(num_tokens - num_draft_tokens, num_tokens, verify_s, step)
        if draft_stream_tokens > 0 and draft_seconds > 0:
            n = max(draft_passes, 1)
            self.draft.add([1.0, draft_stream_tokens / n], draft_seconds / n)

    @property
    def ready(self) -> bool:
        """Enough step times to trust the costs (before: the warm-up behaviour)."""
        return self.verify.count >= self.cfg.warmup_samples

    def base(self, reqs: int) -> float | None:
        """The measured step of this batch size without drafts (None: not measured yet)."""
        return self.cells.get(reqs, reqs)

    def token_cost(self) -> float:
        """Seconds one more verified token costs. Never below ``min_token_cost`` of a
        batch-1 step: every token goes through the LM head and the sampler, and a fit that
        never sees the token count vary (a steady batch, drafts always the same length)
        would otherwise call drafts free, which no cost scale could correct."""
        return max(float(self.verify.weights()[1]), self.token_floor())

    def token_floor(self) -> float:
        """``min_token_cost`` of a batch-1 step: the least a verified draft token costs."""
        w = self.verify.weights()
        return self.cfg.min_token_cost * max(float(w[0] + w[1]), 0.0)

    def verify_cost(self, reqs: int, drafts) -> np.ndarray:
        """Seconds of a step verifying ``reqs`` requests with ``drafts`` draft tokens in all
        (scalar or tensor). Where this batch size's cells are measured (:class:`CellCost`),
        they decide: the no-draft cell is the base and drafts cost the measured difference,
        interpolated between measured draft counts and continued past the last one with
        the fitted per-token cost; elsewhere the linear fit. Either way a draft costs at
        least ``min_token_cost`` a token: a noisy cell must not make drafts look free."""
        w = self.verify.weights()
        m = floats(drafts)
        token = self.token_cost()
        base = float(w[0] + w[1] * reqs)
        extra = token * m + max(float(w[2]), 0.0) * (m > 0)
        anchor = self.cells.get(reqs, reqs)
        if anchor is not None:
            base = anchor
            known = self.cells.known_drafts(reqs)
            if known:
                extra = _interpolate(m, known, anchor, token)
        extra = np.maximum(extra, self.token_floor() * m)
        return np.maximum(base + self.cfg.cost_scale * extra, 1e-6)

    def curve(self, reqs: int, n: int) -> np.ndarray:
        """``verify_cost(reqs, m)`` for m = 0..n, re-solved every ``recheck_every``
        observed steps (or when a new cell appears): a step asks for it several times
        (plan, decide, chain, the probe check) and solving it is most of the plan's cost."""
        key = (reqs, self.verify.count // self.cfg.recheck_every,
               len(self.cells.cells.get(reqs, ())), self.cfg.cost_scale)
        memo = self._curve_memo
        if memo is None or memo[0] != key or memo[1].size <= n:
            memo = self._curve_memo = (key, self.verify_cost(
                reqs, np.arange(max(n, 4 * self.cfg.gamma) + 1, dtype=np.float64)))
        return memo[1][:n + 1]

    def threshold(self, reqs: int, step: int) -> float:
        """Expected accepted tokens a drafted token must bring to pay for its verification:
        its marginal verification seconds x tokens per second without speculation. Kept for
        ``recheck_every`` policy steps (``step``) per batch size: it is asked every step a
        match exists, and re-solving the costs each time is most of what speculation costs
        while it is off."""
        if not self.ready or reqs <= 0:
            return 0.0
        key = (reqs, step // self.cfg.recheck_every)
        if self._tau_memo is None or self._tau_memo[0] != key:
            per_token = self.cfg.cost_scale * self.token_cost()
            self._tau_memo = (key, per_token * reqs / float(self.verify_cost(reqs, 0.0)))
        return self._tau_memo[1]

    def draft_cost(self, reqs: int, depth: int) -> float:
        """Seconds of the draft pass(es) over ``depth`` streams of ``reqs`` requests."""
        if depth <= 0:      # no stream pass (candidates only)
            return 0.0
        passes = depth if self.cfg.sequential else 1
        n = float(reqs * depth / passes)
        if self.draft.count >= 2:
            return passes * max(self.draft.predict([1.0, n]), 0.0)
        # prior: the stream pass is N_s/L of a target forward over the same tokens
        w = self.verify.weights()
        return passes * max(float(w[0] + w[1] * n) * self.cfg.draft_layer_fraction, 0.0)

    def plan_draft_costs(self, reqs: int, n: int, depth: int) -> np.ndarray:
        """Draft-pass seconds of a step with m = 0..n drafts, before the pass: none for 0;
        one pass over ``depth`` streams; chain streams as many passes as the longest
        chain needs when the m drafts are spread evenly (ceil(m / reqs), at most depth)."""
        m = np.arange(n + 1, dtype=np.float64)
        if not self.cfg.sequential:
            return (m > 0) * self.draft_cost(reqs, depth)
        passes = np.minimum(np.ceil(m / max(reqs, 1)), max(depth, 1))
        return passes * self.draft_cost(reqs, 1)

    def summary(self) -> dict:
        w = self.verify.weights().tolist() if self.verify.ready else None
        d = self.draft.weights().tolist() if self.draft.ready else None
        return {"verify_cost_s": {"per_step": w[0], "per_token": w[1], "any_drafts": w[2]} if w else None,
                "draft_cost_s": {"per_pass": d[0], "per_stream_token": d[1]} if d else None,
                "verify_cells": self.cells.table()}
