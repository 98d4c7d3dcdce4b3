"""Cost-aware draft length: how many stream tokens each request drafts this step.

Pure torch/python, no vLLM: the proposer feeds it what it sees (the streams' top-1
probabilities, how many drafts each request got accepted, how long steps took) and
asks two questions every step:

* :meth:`DraftPolicy.plan` (before the draft pass): run the stream pass at all, and
  over how many streams? Skipping it saves the pass's own cost when speculation
  cannot pay at this batch size.
* :meth:`DraftPolicy.choose` (after it): each request's draft length 0..g.

The objective is tokens per second of the whole step. With R requests decoding and m
draft tokens in total, a step costs ``V(R + m) + D`` (verification of R + m tokens, the
draft pass) and yields ``R + G_m`` tokens in expectation, where ``G_m`` sums the chain
probabilities ``c_1 * ... * c_i`` of the m drafted positions (``c_j``: the calibrated
probability that stream j is accepted given streams < j were). All increments cost the
same verification time, so the best m drafts are the m largest chain products; the
policy evaluates every m (``m = 0``: no speculation, no draft pass, ``R / V(R)``) and
takes the best. ``V`` is what the runner measured for this batch size and token count
where it has measured it (:class:`CellCost`; the curve is not a line on every CPU) and a
linear fit of the measured step times elsewhere (:class:`CostModel`), as is ``D``; the
stream probabilities are corrected online from observed acceptance (:class:`Calibrator`).
Before the pass its cost counts (chain streams: one pass per stream, as many as the
longest chain needs); after it, the pass is paid and drafts only have to pay for their
verification.

When the best plan is "off", the draft pass is skipped; a probe pass runs after 4, 8,
16 ... 64 skipped steps so that acceptance statistics stay fresh and speculation comes
back when the batch shrinks or the streams become confident. Probes draft 1, 2, .. g
tokens in turn, so that the cost of every draft count keeps being measured. Nothing is forgotten
while speculation is off (the calibration only learns from drafted positions), so
acceptance does not collapse after such a stretch.

``mode="fixed"`` is the previous behaviour: every stream, chain cut at the first
probability below ``min_draft_prob``.

**A second source** (the proposer's match source, match_source.py; the policy knows it
only as :class:`Candidates`: a named draft per request with a raw confidence per
position). Its confidences get their own :class:`Calibrator`, learnt from the acceptance
of the drafts taken from it, so both sources speak in calibrated chain probabilities.
Per request the policy takes the draft worth more: the sum over positions of
``chain - tau``, where ``tau`` is the gain a drafted token must bring to pay for its
verification (measured per-token cost x tokens per second without speculation); then
the draft lengths are chosen across requests as above. :meth:`DraftPolicy.plan` sees the
candidates too: the stream pass runs only if streams would be taken by some request and
pay for the pass; a request with a good match drafts even when the pass is skipped (no
draft-pass cost). The lookups themselves are paid for too: where they cost more seconds than
their drafts saved, they pause (:class:`MatchBudget`, match_budget.py). In ``fixed`` mode a request takes the candidate when its calibrated
expected accepted tokens exceed those of its (cut) stream chain.

**What a token is worth.** Tokens per second prices an accepted draft at a whole token of
the step without drafts, which holds while finished requests are replaced (a server, a
queue). In a batch that only drains, the run lasts as long as its longest request and an
accepted token mostly lets a request leave a step sooner; the policy sees which case it is
in from the requests that come and go (batch_turnover.py) and prices accepted tokens
accordingly (:meth:`DraftPolicy._value`), in every choice and in what the realized guard
and the match budget count. Opt-in (``drain_value``): measured, it drafted too little at batch
4 (see batch_turnover.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .batch_turnover import Turnover
from .match_budget import MatchBudget
from .realized_guard import RealizedGuard

MODES = ("auto", "fixed")


@dataclass
class PolicyConfig:
    gamma: int                              # streams available (num_speculative_tokens)
    mode: str = "auto"
    min_draft_prob: float = 0.0             # fixed mode's cut (and auto's until costs are known)
    sequential: bool = False                # chain streams: the draft pass runs once per stream
    draft_layer_fraction: float = 0.15      # N_s / L: prior for the draft pass's cost
    cost_scale: float = 1.0                 # multiplies the verification cost of drafts (tests)
    force_off_steps: int = 0                # N steps without speculation (tests) ...
    force_off_from: int = 0                 # ... after this many steps
    warmup_samples: int = 6                 # timing samples before the cost model is trusted
    probe_min: int = 4
    probe_max: int = 64
    probe_rows: int = 4                     # a probe's pass covers at most this many requests
    optimism: float = 1.15                  # per-request choice beats the average profile
    min_gain: float = 0.08                  # speculate only if predicted >= 8% faster than off
    decide_gain: float = 0.02               # after the pass: drafts >= 2% faster than none
    min_token_cost: float = 0.01            # a verified token costs >= 1% of a batch-1 step
    calib_bins: int = 10
    calib_prior: float = 16.0               # pseudo-observations at the raw probability
    calib_decay: float = 0.9995             # per observed position: ~2000-observation memory
    cost_decay: float = 0.97                # per step: ~30-step memory of step times
    full_depth_every: int = 16              # a pass over all streams this often (their stats)
    recheck_every: int = 4                  # an "off" plan is re-solved at most every 4 steps
    refresh_every: int = 64                 # re-measure a batch size's no-draft step this often
    realized_guard: bool = True             # raise the bar where drafting steps were slower
    guard_target: float | None = None       # ... than this x their steps without; None: 1 + min_gain
    match_budget: bool = True               # pause lookups where they cost more than they save
    drain_value: bool = False               # price tokens lower in a batch that only drains (opt-in)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"draft_policy must be one of {MODES}, got {self.mode!r}")
        if self.gamma < 1:
            raise ValueError("gamma must be >= 1")


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
        self.n, self.decay, self.ridge = n_features, decay, ridge
        self.skip_first = skip_first          # first calls: compilation, cold caches
        self.slope_prior = slope_prior        # per feature after the intercept: fraction of y/x
        # sums kept as Python floats: add() runs every step, and tensor ops on 3x3 matrices
        # cost ~10x more than the arithmetic (0.4 ms a step); tensors only in weights()
        self._xtx = [[0.0] * n_features for _ in range(n_features)]
        self._xty = [0.0] * n_features
        self.sw = 0.0
        self.sy = 0.0
        self.count = 0
        self._w: torch.Tensor | None = None
        self._w_stale: list[float] | None = None   # last solved weights, for clipping

    def add(self, x: list[float], y: float) -> None:
        if not (y > 0 and math.isfinite(y)):
            return
        if self.skip_first > 0:
            self.skip_first -= 1
            return
        if self._w is not None:
            self._w_stale = self._w.tolist()
        if self.count >= 4:
            # clip against the last solved fit (a few samples old at most when nobody asked
            # for a new one): re-solving on every sample cost more than the step's decision
            if self._w_stale is None or self.count % 16 == 0:
                self._w_stale = self.weights().tolist()
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

    def weights(self) -> torch.Tensor:
        if self._w is None:
            w = torch.zeros(self.n, dtype=torch.float64)
            if self.sw > 0:
                xtx = torch.tensor(self._xtx, dtype=torch.float64)
                mean_x = xtx[0] / self.sw                # x[0] == 1: first row holds sums of x
                mean_y = self.sy / self.sw
                a = xtx
                b = torch.tensor(self._xty, dtype=torch.float64)
                for i in range(1, self.n):
                    scale = max(float(mean_x[i]), 1e-6)
                    lam = self.ridge * self.sw * scale * scale
                    prior = self.slope_prior[i - 1] * mean_y / max(float(mean_x[i]), 1.0)
                    a[i, i] += lam
                    b[i] += lam * prior
                a[0, 0] += 1e-9
                w = self._solve_nonnegative_slopes(a, b)
            self._w = w
        return self._w

    @staticmethod
    def _solve_nonnegative_slopes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a w = b`` with every slope after the intercept >= 0: a cost never falls with
        more work. Collinear features (a policy that only ever drafts one token makes
        ``tokens`` and ``any_drafts`` equal) otherwise split one cost into a large positive
        and a negative term, which mis-prices the drafts the data never showed."""
        free = list(range(a.shape[0]))
        while True:
            w = torch.zeros(a.shape[0], dtype=torch.float64)
            idx = torch.tensor(free)
            w[idx] = torch.linalg.solve(a[idx][:, idx], b[idx])
            neg = [i for i in free[1:] if w[i] < 0]
            if not neg:
                return w
            free.remove(min(neg, key=lambda i: float(w[i])))

    def predict(self, x: list[float]) -> float:
        return float(self.weights() @ torch.tensor(x, dtype=torch.float64))

    @property
    def ready(self) -> bool:
        return self.count > 0


class CellCost:
    """Measured verification seconds per (requests, tokens) cell: an exponentially weighted
    mean per cell that decays only with the cell's own samples.

    The linear fit (:class:`CostModel`) forgets in steps, and while speculation is off the
    steps with drafts are a probe every 64 steps: a single slow probe then set the per-token
    slope for good (16 ms a token at batch 1, where the truth is ~1 ms) and kept speculation
    off. A cell keeps what it measured until that cell is measured again, and it follows the
    runner's real curve, which is not a line: vLLM-CPU's oneDNN matmuls take a slower path
    for 1-2 rows than for 3+ (SmolLM2 at batch 1, one EPYC core: a step verifying 3 or 5
    tokens is faster than one verifying 2)."""

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


@dataclass
class Candidates:
    """Another source's drafts for the same requests as the streams' rows: raw per-position
    confidence ``probs`` [R, w] (anything past a row's draft is ignored) and the draft
    lengths [R] (0: no draft for that request)."""

    source: str
    probs: torch.Tensor
    lengths: torch.Tensor
    chain: torch.Tensor | None = None      # :meth:`DraftPolicy.expected`, if already computed


@dataclass
class Choice:
    lengths: torch.Tensor          # [R] tokens each request drafts (0..g or 0..w)
    source: list                   # [R] STREAMS, the candidates' source, or None (nothing)


STREAMS = "streams"


@dataclass
class Plan:
    run_pass: bool
    depth: int          # streams to run (0 when the pass is skipped)
    probe: bool = False
    use_candidates: bool = True     # False: no candidate can pay this step (drop them)
    # run the pass over at most this many requests (0: all). A probe measures what drafts
    # cost at this batch size and keeps acceptance fresh, and a few requests do both: over
    # all of them it cost ~30% of a step at batch 16 and nearly a whole one at batch 64
    rows: int = 0


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
    last_choice: list[int] = field(default_factory=list)
    drafts_by_source: dict = field(default_factory=dict)   # request drafts taken per source

    def as_dict(self) -> dict:
        return {"steps": self.steps, "steps_without_speculation": self.steps_without_speculation,
                "draft_tokens": self.draft_tokens, "request_steps": self.request_steps,
                "mean_draft_tokens_per_step": self.draft_tokens / self.steps if self.steps else 0.0,
                "mean_draft_tokens_per_request_step":
                    self.draft_tokens / self.request_steps if self.request_steps else 0.0,
                "passes": self.passes, "probes": self.probes, "skipped_passes": self.skipped_passes,
                "anchor_refreshes": self.anchor_refreshes,
                "drafts_by_source": dict(self.drafts_by_source)}


class DraftPolicy:
    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        g = cfg.gamma
        # verification seconds ~ a + b * tokens + c * [any drafts]; priors: b = half the
        # mean cost per token, c = 0
        self.verify = CostModel(3, cfg.cost_decay, slope_prior=[0.5, 0.0], skip_first=3)
        # draft pass seconds ~ d0 + d1 * stream tokens (prior: the per-token part dominates)
        self.draft = CostModel(2, cfg.cost_decay, slope_prior=[0.8], skip_first=3)
        self.cells = CellCost(stale_after=cfg.refresh_every)
        # batch size -> policy step it was first planned, or its last no-draft refresh
        self._anchor_asked: dict[int, int] = {}
        self._probe_cycle = 0                 # probes draft 1, 2, .. g tokens in turn
        self.calib = Calibrator(g, cfg.calib_bins, cfg.calib_prior, cfg.calib_decay)
        self.source_calib: dict[str, Calibrator] = {}   # other sources' confidences
        # mean chain product per position over requests (from passes): the "running
        # acceptance" that decides whether a pass is worth running at all
        self.profile = torch.full((g,), float("nan"), dtype=torch.float64)
        self.stats = PolicyStats()
        self._skipped = 0
        self._backoff = cfg.probe_min
        self._recent_max_k = g
        self._passes_since_full = 0
        self._probing = False
        self._empty_passes = 0                # passes in a row whose choice was "no drafts"
        self._counted_off = False             # plan() counted this step as without speculation
        # (batch size, step // recheck_every) of the last "off" plan without candidates: the
        # same batch in the same window of steps is off again without re-solving the plan
        # (~0.6 ms a step at batch 16 on one core: the cost of speculation while it is off)
        self._off_memo: tuple[int, int] | None = None
        self._tau_memo: tuple[tuple[int, int], float] | None = None   # see _threshold
        self._curve_memo: tuple[tuple, torch.Tensor] | None = None      # see _cost_curve
        self._match_paid_at: dict[int, int] = {}     # batch size -> last step a match could pay
        self.guard = RealizedGuard(target=1.0 + cfg.min_gain if cfg.guard_target is None
                                   else cfg.guard_target)
        self.budget = MatchBudget()
        self.turnover = Turnover()

    # ---------------------------------------------------------------- observations
    def observe_requests(self, req_ids) -> None:
        """The ids of this step's requests: whether finished requests are replaced
        (:class:`Turnover`, see :meth:`_value`)."""
        if self.cfg.drain_value:
            self.turnover.observe(req_ids)

    def observe_step(self, num_tokens: int, num_draft_tokens: int, seconds: float,
                     draft_seconds: float = 0.0, draft_stream_tokens: int = 0,
                     draft_passes: int = 1) -> None:
        """One finished decode step: ``num_tokens`` verified (requests + drafts) in
        ``seconds`` of wall time, of which ``draft_seconds`` were the draft pass(es) over
        ``draft_stream_tokens`` stream tokens in ``draft_passes`` passes."""
        verify_s = seconds - draft_seconds
        if verify_s > 0:
            self.verify.add([1.0, float(num_tokens), 1.0 if num_draft_tokens else 0.0], verify_s)
            if self.verify.count > 0:       # past the fit's skipped first samples (compiles)
                self.cells.add(num_tokens - num_draft_tokens, num_tokens, verify_s,
                               self.stats.steps)
        if draft_stream_tokens > 0 and draft_seconds > 0:
            n = max(draft_passes, 1)
            self.draft.add([1.0, draft_stream_tokens / n], draft_seconds / n)

    def observe_outcome(self, reqs: int, produced: int, seconds: float,
                        matched: bool = False) -> None:
        """A finished step that verified drafts: ``produced`` tokens emitted for ``reqs``
        requests in ``seconds`` of wall time (all of it). Checked against this batch
        size's step without drafts (:class:`RealizedGuard`); ``matched``: some of the drafts
        came from the match source, whose lookups this step helps pay for (:class:`MatchBudget`)."""
        base = self.cells.get(reqs, reqs)
        # accepted drafts priced (_value; 1 unless the opt-in drain pricing says otherwise)
        worth = produced - (1.0 - self._value(reqs)) * max(produced - reqs, 0)
        if self.cfg.realized_guard and base is not None:
            self.guard.observe(reqs, worth, seconds, base)
        if matched and self.cfg.match_budget and self._ready():
            self.budget.saved(reqs, worth, seconds, float(self._cost_curve(reqs, 0)[0]),
                              self.stats.steps)

    def observe_lookup(self, reqs: int, seconds: float) -> None:
        """The match source's lookup this step (feeding, lookup, calibration) took ``seconds``."""
        if self.cfg.match_budget and self.cfg.mode == "auto" and self._ready():
            self.budget.spent(reqs, seconds, self.stats.steps)

    def observe_acceptance(self, probs: torch.Tensor, drafted: torch.Tensor,
                           accepted: torch.Tensor, source: str = STREAMS) -> None:
        """probs [R, g] raw stream probabilities (or ``source``'s raw confidences) of last
        step's drafts (padding ignored), drafted [R] tokens verified, accepted [R] of them
        accepted."""
        if probs.numel() == 0:
            return
        R, g = probs.shape
        calib = self.calib if source == STREAMS else self._calibrator(source, g)
        j = torch.arange(g).expand(R, g)
        d = drafted.to(torch.int64)[:, None].clamp(max=g)
        a = accepted.to(torch.int64)[:, None]
        tested = (j < d) & (j <= a)
        calib.observe(j[tested], probs[tested].clamp(0.0, 1.0), (j < a)[tested])

    def _calibrator(self, source: str, width: int) -> Calibrator:
        c = self.source_calib.get(source)
        if c is None or c.gamma < width:
            cfg = self.cfg
            c = self.source_calib[source] = Calibrator(width, cfg.calib_bins, cfg.calib_prior,
                                                       cfg.calib_decay)
        return c

    def expected(self, cands: Candidates) -> torch.Tensor:
        """Calibrated chain probabilities [R, w] of the candidates' drafts (0 past each)."""
        p = cands.probs.double().clamp(0.0, 1.0)
        R, w = p.shape
        if w == 0 or R == 0:
            return torch.zeros(R, w, dtype=torch.float64)
        cal = self._calibrator(cands.source, w).calibrate(p)
        inside = torch.arange(w)[None, :] < cands.lengths.to(torch.int64)[:, None]
        return (cal * inside).cumprod(1)

    def _threshold(self, reqs: int) -> float:
        """Expected accepted tokens a drafted token must bring to pay for its verification:
        its marginal verification seconds x tokens per second without speculation. Kept for
        ``recheck_every`` steps per batch size: it is asked every step a match exists, and
        re-solving the costs each time was most of what speculation cost while it was off."""
        if not self._ready() or reqs <= 0:
            return 0.0
        key = (reqs, self.stats.steps // self.cfg.recheck_every)
        if self._tau_memo is None or self._tau_memo[0] != key:
            per_token = self.cfg.cost_scale * float(self._token_cost())
            self._tau_memo = (key, per_token * reqs / float(self._verify_cost(reqs, 0.0))
                              / self._value(reqs))
        return self._tau_memo[1]

    def _value(self, reqs: int) -> float:
        """What an accepted draft token is worth, as a share of a token of the step without
        drafts (``T(R) / R`` seconds). 1 where finished requests are replaced; in a batch
        that only drains, the seconds it saves are the step's per-request part ``s`` (the
        request leaves a step sooner; the run still lasts as long as its longest request),
        ``s R / T(R)`` of it (batch_turnover.py). Mixed by the share of leaves replaced. A
        lone request is its run's longest: 1."""
        if not self.cfg.drain_value or reqs <= 1:      # asked several times a step: off first
            return 1.0
        rho = self.turnover.replaced
        if rho >= 1.0 or not self._ready():
            return 1.0
        drained = float(self._token_cost()) * reqs / float(self._cost_curve(reqs, 0)[0])
        return rho + (1.0 - rho) * min(max(drained, 0.05), 1.0)

    # ---------------------------------------------------------------- cost helpers
    def _ready(self) -> bool:
        return self.verify.count >= self.cfg.warmup_samples

    def _token_cost(self) -> torch.Tensor:
        """Seconds one more verified token costs. Never below ``min_token_cost`` of a
        batch-1 step: every token goes through the LM head and the sampler, and a fit that
        never sees the token count vary (a steady batch, drafts always the same length)
        would otherwise call drafts free, which no cost scale could correct."""
        return self.verify.weights()[1].clamp(min=self._token_floor())

    def _verify_cost(self, reqs: int, drafts: torch.Tensor | float) -> torch.Tensor:
        """Seconds of a step verifying ``reqs`` requests with ``drafts`` draft tokens in all
        (scalar or tensor). Where this batch size's cells are measured (:class:`CellCost`),
        they decide: the no-draft cell is the base and drafts cost the measured difference,
        interpolated between measured draft counts and continued past the last one with
        the fitted per-token cost; elsewhere the linear fit. Either way a draft costs at
        least ``min_token_cost`` a token: a noisy cell must not make drafts look free."""
        w = self.verify.weights()
        m = torch.as_tensor(drafts, dtype=torch.float64)
        token = self._token_cost()
        base = w[0] + w[1] * reqs
        extra = token * m + w[2].clamp(min=0.0) * (m > 0).double()
        anchor = self.cells.get(reqs, reqs)
        if anchor is not None:
            base = torch.tensor(anchor, dtype=torch.float64)
            known = self.cells.known_drafts(reqs)
            if known:
                extra = _interpolate(m, known, anchor, float(token))
        extra = torch.maximum(extra, self._token_floor() * m)
        return (base + self.cfg.cost_scale * extra).clamp(min=1e-6)

    def _cost_curve(self, reqs: int, n: int) -> torch.Tensor:
        """``_verify_cost(reqs, m)`` for m = 0..n, re-solved every ``recheck_every``
        observed steps (or when a new cell appears): a step asks for it up to four times
        (plan, decide, chain, the probe check) and solving it was most of the plan's cost."""
        key = (reqs, self.verify.count // self.cfg.recheck_every,
               len(self.cells.cells.get(reqs, ())), self.cfg.cost_scale)
        memo = self._curve_memo
        if memo is None or memo[0] != key or memo[1].numel() <= n:
            memo = self._curve_memo = (key, self._verify_cost(
                reqs, torch.arange(max(n, 4 * self.cfg.gamma) + 1, dtype=torch.float64)))
        return memo[1][:n + 1]

    def _token_floor(self) -> float:
        """``min_token_cost`` of a batch-1 step: the least a verified draft token costs."""
        w = self.verify.weights()
        return self.cfg.min_token_cost * float((w[0] + w[1]).clamp(min=0.0))

    def _draft_cost(self, reqs: int, depth: int) -> float:
        if depth <= 0:      # no stream pass (candidates only)
            return 0.0
        passes = depth if self.cfg.sequential else 1
        n = float(reqs * depth / passes)
        if self.draft.count >= 2:
            return passes * max(self.draft.predict([1.0, n]), 0.0)
        # prior: the stream pass is N_s/L of a target forward over the same tokens
        w = self.verify.weights()
        return passes * max(float(w[0] + w[1] * n) * self.cfg.draft_layer_fraction, 0.0)

    def _plan_draft_costs(self, reqs: int, n: int, depth: int) -> torch.Tensor:
        """Draft-pass seconds of a step with m = 0..n drafts, before the pass: none for 0;
        one pass over ``depth`` streams; chain streams as many passes as the longest
        chain needs when the m drafts are spread evenly (ceil(m / reqs), at most depth)."""
        m = torch.arange(n + 1, dtype=torch.float64)
        if not self.cfg.sequential:
            return (m > 0).double() * self._draft_cost(reqs, depth)
        passes = torch.ceil(m / max(reqs, 1)).clamp(max=max(depth, 1))
        return passes * self._draft_cost(reqs, 1)

    def continue_chain(self, probs: torch.Tensor, num_reqs: int | None = None) -> bool:
        """Chain streams, after pass j (``probs`` [R, j] raw top-1 probabilities so far): is
        one more pass worth its cost? The step's best tokens per second with the drafts at
        hand (passes so far paid) against the same with one more pass, whose drafts are
        expected at each request's calibrated chain times the running conditional
        acceptance of position j+1 (1 while unknown). Fixed mode, auto before costs are
        known, and probes (they measure every depth) always continue."""
        if self.cfg.mode == "fixed" or not self._ready() or self._probing:
            return True
        R, j = probs.shape
        reqs = R if num_reqs is None else num_reqs
        chain = self.calib.calibrate(probs).cumprod(1)                   # [R, j]
        q = 1.0
        if j < self.profile.numel():
            prev, cur = float(self.profile[j - 1]), float(self.profile[j])
            if math.isfinite(prev) and math.isfinite(cur) and prev > 0:
                q = min(1.0, cur / prev * self.cfg.optimism)
        spent = self._draft_cost(R, j)
        now = torch.sort(chain.reshape(-1), descending=True)[0]
        more = torch.sort(torch.cat([chain.reshape(-1), chain[:, -1] * q]), descending=True)[0]
        _, rate_now, _ = self._best(reqs, now, spent, 0.0)
        _, rate_more, _ = self._best(reqs, more, spent + self._draft_cost(R, 1), 0.0)
        return rate_more > rate_now

    def _best(self, reqs: int, gains_sorted: torch.Tensor, draft_costs: torch.Tensor | float,
              min_gain: float) -> tuple[int, float, float]:
        """(best number of drafts m, its tokens/s, tokens/s with m = 0) for a step whose
        draft passes cost ``draft_costs[m]`` seconds (a float: the same for every m, a pass
        already paid). m = 0 unless the best beats it by
        ``min_gain``: before the pass the loss is asymmetric (a wrong "on" makes the server
        slower, a wrong "off" only forgoes a gain) and step times on a busy machine are
        noisy; after it (pass paid) a small margin only absorbs the noise. Where this batch
        size's drafting steps were slower than its steps without drafts, the bar is higher
        (:class:`RealizedGuard`)."""
        min_gain += self.guard.margin(reqs)
        n = gains_sorted.numel()
        gains = gains_sorted.cumsum(0) * self._value(reqs)
        tokens = reqs + torch.cat([torch.zeros(1, dtype=torch.float64), gains])
        rate = tokens / (self._cost_curve(reqs, n) + draft_costs)
        base = float(rate[0])
        best = int(torch.argmax(rate))
        if rate[best] < (1.0 + min_gain) * base:
            best = 0
        return best, float(rate[best]), base

    # ---------------------------------------------------------------- decisions
    def plan(self, num_reqs: int, candidates: torch.Tensor | None = None) -> Plan:
        """Before the draft pass: run it (over how many streams) or not. ``candidates``:
        the calibrated chains [num_reqs, w] of another source's drafts (:meth:`expected`),
        if any: requests they serve better need no streams, and they draft without a pass."""
        cfg = self.cfg
        self._counted_off = False
        if num_reqs <= 0:
            return Plan(False, 0)
        self.stats.steps += 1
        self.stats.request_steps += num_reqs
        if cfg.mode == "fixed":
            return Plan(True, cfg.gamma)
        if self._forced_off():
            return self._skip()
        if not self._ready() or torch.isnan(self.profile[0]):
            return Plan(True, cfg.gamma)
        if self._anchor_due(num_reqs):
            return self._refresh_anchor(num_reqs)
        use_cands = candidates is not None and candidates.numel() > 0 and bool(
            (candidates[:, 0] > self._threshold(num_reqs)).any())
        if use_cands:
            self._match_paid_at[num_reqs] = self.stats.steps
        # a candidate whose first token cannot pay for its verification is worth nothing
        # (chains only fall): with none left this is the streams-only plan, memo included
        plan = self._plan_streams(num_reqs, candidates.double() if use_cands else None)
        plan.use_candidates = use_cands
        return plan

    def match_due(self, num_reqs: int) -> bool:
        """Look for matches this step? Always while costs are unknown, in fixed mode, and
        for a batch size where a match could pay in the last ``2 * recheck_every`` steps;
        elsewhere every ``recheck_every`` steps. At batch 16+ a match rarely pays for its
        verification, and feeding the tree and looking up every request each step was a
        third of what speculation cost while it was off (~1 ms of a 70 ms step); the tree
        is fed in bulk when the lookup comes, and a repetitive stretch that does pay lasts
        longer than a few steps. Where lookups have cost more than their drafts saved, they
        pause (:class:`MatchBudget`)."""
        cfg = self.cfg
        if self._forced_off(ahead=1):     # asked before plan() counts the step
            return False
        if cfg.mode == "fixed" or not self._ready():
            return True
        step = self.stats.steps
        if cfg.match_budget and not self.budget.due(num_reqs, step):
            return False
        last = self._match_paid_at.get(num_reqs)
        return (last is not None and step - last <= 2 * cfg.recheck_every) \
            or step % cfg.recheck_every == 0

    def _plan_streams(self, num_reqs: int, cand: torch.Tensor | None) -> Plan:
        cfg = self.cfg
        no_cands = cand is None
        if no_cands and self._off_memo == (num_reqs, self.stats.steps // cfg.recheck_every):
            return self._skip()     # decided "off" for this batch size a few steps ago
        depth = self._depth()
        # average-request estimate: every request drafts the same k of the running profile
        prof = (torch.nan_to_num(self.profile[:depth], nan=0.0) * cfg.optimism).clamp(max=1.0)
        if no_cands:
            gains, _ = torch.sort(prof.repeat(num_reqs), descending=True)
            best, _, _ = self._best(num_reqs, gains,
                                    self._plan_draft_costs(num_reqs, gains.numel(), depth), cfg.min_gain)
            # the profile is an estimate; what drafting steps of this batch size really bought
            # is a measurement: where they beat steps without drafts by the plan's own bar,
            # keep drafting (underconfident streams: chain12 at batch 1 drafted on 23% of
            # steps for 1.17x where drafting every step gave 1.28x). Not under a cost_scale
            # above 1: it says drafts cost more than measured, which no measurement overrules
            paying = best > 0 or (cfg.realized_guard and cfg.cost_scale <= 1.0
                                  and self.guard.paying(num_reqs, 1.0 + cfg.min_gain))
            if paying and self._empty_passes < 4:
                return Plan(True, depth)
            self._off_memo = (num_reqs, self.stats.steps // cfg.recheck_every)
            return self._skip()
        tau = self._threshold(num_reqs)
        streams_win = (cand - tau).clamp(min=0.0).sum(1) < (prof - tau).clamp(min=0.0).sum()
        n_streams = int(streams_win.sum())
        with_pass = torch.cat([prof.repeat(n_streams), cand[~streams_win].reshape(-1)])
        best, rate, _ = self._best(num_reqs, torch.sort(with_pass, descending=True)[0],
                                   self._plan_draft_costs(num_reqs, with_pass.numel(), depth), cfg.min_gain)
        flat_cand = torch.sort(cand.reshape(-1), descending=True)[0]
        _, rate_without, _ = self._best(num_reqs, flat_cand, 0.0, cfg.min_gain)
        if n_streams > 0 and best > 0 and rate > rate_without and self._empty_passes < 4:
            return Plan(True, depth)
        return self._skip()

    def _anchor_due(self, reqs: int) -> bool:
        """Every choice prices drafts against this batch size's step without drafts, and
        while speculation stays on that step is never measured: an early slow sample (79 ms
        where the truth was 48, chain streams at batch 1) then made every draft look cheap
        and kept speculation on for good. So the no-draft step is re-measured when its last
        sample (or the last attempt) is ``refresh_every`` steps old: one step in 64 at most."""
        step = self.stats.steps
        asked = self._anchor_asked.setdefault(reqs, step)
        last = self.cells.last_sample(reqs, reqs)
        return step - max(asked, last if last is not None else asked) > self.cfg.refresh_every

    def _refresh_anchor(self, reqs: int) -> Plan:
        self._anchor_asked[reqs] = self.stats.steps
        self.stats.anchor_refreshes += 1
        return self._off_step(use_candidates=False)

    def _forced_off(self, ahead: int = 0) -> bool:
        start = self.cfg.force_off_from
        return start < self.stats.steps + ahead <= start + self.cfg.force_off_steps

    def _skip(self) -> Plan:
        self._skipped += 1
        if not self._forced_off() and self._skipped >= self._backoff:
            self._skipped = 0
            self._backoff = min(2 * self._backoff, self.cfg.probe_max)
            self.stats.probes += 1
            self._probing = True
            return Plan(True, self.cfg.gamma, probe=True, rows=self.cfg.probe_rows)
        self.stats.skipped_passes += 1
        return self._off_step()

    def _off_step(self, use_candidates: bool = True) -> Plan:
        """No pass this step, counted as a step without speculation (unless another
        source drafts after all: see :meth:`_count`)."""
        self._counted_off = True
        self.stats.steps_without_speculation += 1
        return Plan(False, 0, use_candidates=use_candidates)

    def _depth(self) -> int:
        g = self.cfg.gamma
        self._passes_since_full += 1
        if self._passes_since_full >= self.cfg.full_depth_every:
            self._passes_since_full = 0
            return g
        return max(1, min(g, self._recent_max_k + 1))

    def choose(self, probs: torch.Tensor, num_reqs: int | None = None) -> torch.Tensor:
        """probs [R, g] raw top-1 probabilities of the R active requests' streams ->
        draft lengths [R] (int64, 0..g). ``num_reqs``: requests decoding this step (the
        rows of ``probs`` unless told)."""
        return self.decide(probs, num_reqs).lengths

    def decide(self, probs: torch.Tensor | None, num_reqs: int | None = None,
               candidates: Candidates | None = None) -> Choice:
        """Each request's draft: its source and length. ``probs`` [R, g]: the streams'
        raw top-1 probabilities (None when the stream pass did not run this step);
        ``candidates``: another source's drafts for the same R requests."""
        cfg = self.cfg
        ran = probs is not None
        R = probs.shape[0] if ran else candidates.probs.shape[0] if candidates is not None else 0
        reqs = R if num_reqs is None else num_reqs
        probing = False
        if ran:
            self.stats.passes += 1
            probing, self._probing = self._probing, False
        if R == 0:
            return self._count(Choice(torch.zeros(0, dtype=torch.int64), []), ran)
        g = probs.shape[1] if ran else 0
        cand_chain = None
        if candidates is not None:
            cand_chain = candidates.chain if candidates.chain is not None else self.expected(candidates)
        chain = self.calib.calibrate(probs).cumprod(1) if ran else None      # [R, g]
        if cfg.mode == "fixed" or not self._ready():
            if ran and cfg.min_draft_prob > 0:
                lengths = (probs >= cfg.min_draft_prob).to(torch.int64).cumprod(1).sum(1)
            else:
                lengths = torch.full((R,), g, dtype=torch.int64)
            if ran and cfg.mode == "auto":
                self._update_profile(chain, g)
                lengths = self._warmup_cap(chain, lengths)
            if cand_chain is None:
                return self._count(self._labelled(lengths, None, None), ran)
            # the draft with more expected accepted tokens (calibrated) per request
            own = (chain * (torch.arange(g)[None, :] < lengths[:, None])).sum(1) if ran \
                else torch.zeros(R, dtype=torch.float64)
            take = cand_chain.sum(1) > own
            lengths = torch.where(take, candidates.lengths.to(torch.int64), lengths)
            return self._count(self._labelled(lengths, take, candidates.source), ran)
        if ran:
            self._update_profile(chain, g)
        if self._forced_off():
            return self._count(Choice(torch.zeros(R, dtype=torch.int64), [None] * R), ran)
        if cand_chain is None:
            take, best_chain = None, chain
            have = torch.full((R,), g, dtype=torch.int64)
        else:
            tau = self._threshold(reqs)
            worth = lambda c: (c - tau).clamp(min=0.0).sum(1)  # noqa: E731
            own = worth(chain) if ran else torch.full((R,), -1.0, dtype=torch.float64)
            take = worth(cand_chain) > own
            w = max(g, cand_chain.shape[1])
            pad = lambda c: torch.nn.functional.pad(c, (0, w - c.shape[1]))  # noqa: E731
            best_chain = pad(cand_chain) if not ran else torch.where(
                take[:, None], pad(cand_chain), pad(chain))
            have = torch.where(take, candidates.lengths.to(torch.int64).clamp(max=w),
                               torch.full((R,), g, dtype=torch.int64))
        W = best_chain.shape[1]
        order = self._ranked(best_chain, have)
        # the pass (if any) is paid: drafts only have to pay for their verification
        spent = self._draft_cost(R, g) if ran else 0.0
        best, rate, _ = self._best(reqs, best_chain.reshape(-1)[order], spent, cfg.decide_gain)
        lengths = self._lengths(order, best, R, W)
        if ran:
            # did the streams earn drafts on their own (a probe's forced token does not count)?
            stream_lengths = lengths if take is None else torch.where(take, 0, lengths)
            # the pass earned its keep only if the step beats no speculation with the pass
            # counted: once it has run its cost is sunk and drafts always look worth it, and
            # a probe at batch 16 that "paid" on those terms brought the next probe (a 20 ms
            # pass) back every 4 steps
            without = reqs / float(self._cost_curve(reqs, 0)[0])
            if cand_chain is not None:      # ... and beats what the matches do without it
                without = max(without, self._best(reqs, torch.sort(
                    cand_chain.reshape(-1), descending=True)[0], 0.0, 0.0)[1])
            earned = rate >= (1.0 + cfg.min_gain) * without
            if int(stream_lengths.sum()) > 0 and (earned or not probing):
                self._empty_passes = 0
                if earned:
                    self._backoff = cfg.probe_min
            elif not probing:
                self._empty_passes += 1
        if probing and best == 0:
            # a probe drafts 1, 2, .. g of the likeliest tokens in turn: the cost of steps
            # with drafts must keep being measured (every count: the curve is no line), or
            # one slow early step could keep speculation off
            self._probe_cycle = self._probe_cycle % max(g, 1) + 1
            lengths = self._lengths(order, min(self._probe_cycle, order.numel()), R, W)
        if ran:
            stream_lengths = lengths if take is None else torch.where(take, 0, lengths)
            k = int(stream_lengths.max())
            self._recent_max_k = max(k, int(0.9 * self._recent_max_k)) if k else max(
                0, self._recent_max_k - 1)
        return self._count(self._labelled(lengths, take, candidates.source if candidates else None),
                           ran)

    def _warmup_cap(self, chain: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Auto mode before costs are known: at most ``gamma`` drafts in the whole step, the
        likeliest. A batch of 64 drafting every stream for the first steps verified 5x its
        tokens while the policy learnt that drafts do not pay there; capped, those steps
        still measure a cost with drafts and batch 1 drafts as before."""
        R, g = chain.shape
        if R * g <= self.cfg.gamma:
            return lengths
        return self._lengths(self._ranked(chain, lengths), self.cfg.gamma, R, g)

    @staticmethod
    def _ranked(chain: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
        """Flat indices into ``chain`` [R, W] of the slots that exist (position < ``have``
        per row), likeliest first. Only tokens that exist can be drafted: the measured cost
        curve is not monotonic on every CPU (batch 1: verifying 3 tokens faster than 1), so
        zero-gain slots past a match's end, or of a request without a match, could otherwise
        look worth taking."""
        R, W = chain.shape
        exists = (torch.arange(W)[None, :] < have[:, None]).reshape(-1)
        flat = torch.where(exists, chain.reshape(-1).double(),
                           torch.full((R * W,), -1.0, dtype=torch.float64))
        return torch.argsort(flat, descending=True)[:int(exists.sum())]

    @staticmethod
    def _lengths(order: torch.Tensor, m: int, R: int, W: int) -> torch.Tensor:
        """Per-request draft lengths when the first ``m`` slots of ``order`` are drafted
        (chains fall along a row, so a row's chosen slots are a prefix)."""
        out = torch.zeros(R * W, dtype=torch.int64)
        out[order[:m]] = 1
        return out.view(R, W).sum(1)

    @staticmethod
    def _labelled(lengths: torch.Tensor, take: torch.Tensor | None, source: str | None) -> Choice:
        names = []
        for k, n in enumerate(lengths.tolist()):
            if n == 0:
                names.append(None)
            else:
                names.append(source if take is not None and bool(take[k]) else STREAMS)
        return Choice(lengths, names)

    def _update_profile(self, chain: torch.Tensor, g: int) -> None:
        mean = chain.mean(0)
        cur = self.profile[:g]
        self.profile[:g] = torch.where(torch.isnan(cur), mean, 0.9 * cur + 0.1 * mean)

    def _count(self, choice: Choice, ran: bool = True) -> Choice:
        total = int(choice.lengths.sum())
        self.stats.draft_tokens += total
        if self._counted_off:           # plan() skipped the pass and counted the step as off
            if total > 0:               # ... but another source drafted after all
                self.stats.steps_without_speculation -= 1
        elif total == 0:
            self.stats.steps_without_speculation += 1
        self._counted_off = False
        for name in choice.source:
            if name is not None:
                self.stats.drafts_by_source[name] = self.stats.drafts_by_source.get(name, 0) + 1
        self.stats.last_choice = choice.lengths.tolist()
        return choice

    # ---------------------------------------------------------------- reporting
    def summary(self) -> dict:
        w = self.verify.weights().tolist() if self.verify.ready else None
        d = self.draft.weights().tolist() if self.draft.ready else None
        return {"mode": self.cfg.mode, **self.stats.as_dict(),
                "verify_cost_s": {"per_step": w[0], "per_token": w[1], "any_drafts": w[2]} if w else None,
                "draft_cost_s": {"per_pass": d[0], "per_stream_token": d[1]} if d else None,
                "verify_cells": self.cells.table(),
                "profile": [None if math.isnan(x) else x for x in self.profile.tolist()],
                "realized": self.guard.table(),
                "match_budget": self.budget.table(),
                "turnover": self.turnover.summary(),
                "calibration": self.calib.per_position(),
                "calibration_table": self.calib.table(),
                "calibration_sources": {name: {"per_position": c.per_position(), "table": c.table()}
                                        for name, c in self.source_calib.items()}}


def _interpolate(m: torch.Tensor, known: list[tuple[int, float]], anchor: float,
                 token: float) -> torch.Tensor:
    """Extra seconds of m drafts from the measured cells ``known`` [(drafts, seconds)] over
    the no-draft ``anchor``: linear between measured counts, the fitted per-token ``token``
    past the last one."""
    xs = torch.tensor([0.0] + [float(k) for k, _ in known], dtype=torch.float64)
    ys = torch.tensor([0.0] + [v - anchor for _, v in known], dtype=torch.float64)
    flat = m.reshape(-1)
    inside = flat.clamp(max=float(xs[-1]))
    hi = torch.searchsorted(xs, inside).clamp(max=xs.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    x0, x1, y0, y1 = xs[lo], xs[hi], ys[lo], ys[hi]
    t = torch.where(x1 > x0, (inside - x0) / (x1 - x0).clamp(min=1e-9), torch.zeros_like(inside))
    out = y0 + t * (y1 - y0) + token * (flat - xs[-1]).clamp(min=0.0)
    return out.view(m.shape)
