"""The draft policy's settings: what the proposer passes in and the tuned constants."""
from __future__ import annotations

from dataclasses import dataclass

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
    always_match_reqs: int = 4              # up to this batch, look for matches every step
    refresh_every: int = 64                 # re-measure a batch size's no-draft step this often
    realized_guard: bool = True             # raise the bar where drafting steps realized less
    match_budget: bool = True               # pause lookups where they cost more than they save
    streams: bool = True                    # False: never a stream pass, the match drafts (ablation)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"draft_policy must be one of {MODES}, got {self.mode!r}")
        if self.gamma < 1:
            raise ValueError("gamma must be >= 1")
