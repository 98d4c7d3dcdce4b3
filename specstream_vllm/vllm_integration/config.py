"""The ``specstream`` speculative settings, validated at the edge (front-end process).

Everything a user can get wrong is checked here, before any worker starts, and the
result is a plain dict that travels to the workers inside ``hf_config.specstream``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..checkpoint import STREAMS_SUBDIR, load_checkpoint, load_checkpoint_config, resolve_checkpoint_dir
from ..errors import CheckpointError, UnsupportedArchitectureError
from specstream_vllm.model_patches import MSA_ARCHITECTURES

METHOD = "specstream"
#: overrides the checkpoint's ``min_draft_prob`` (see checkpoint.GreedyProposal)
MIN_DRAFT_PROB_ENV = "SPECSTREAM_MIN_DRAFT_PROB"
#: overrides the speculative config's ``draft_policy`` ("auto" | "fixed")
DRAFT_POLICY_ENV = "SPECSTREAM_DRAFT_POLICY"
#: speculative-config keys of ours that vLLM's SpeculativeConfig does not know
POLICY_KEYS = ("draft_policy",)


class SpecStreamSettings(BaseModel):
    """What reaches the MSA model class in every worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    checkpoint: str
    num_streams: int = Field(..., ge=1)
    num_stream_layers: int = Field(..., ge=1)
    num_layers: int = Field(..., ge=1)
    lora_rank: int = 0
    lora_scaling: float = 1.0
    lora_targets: tuple[str, ...] = ()
    min_draft_prob: float = Field(0.0, ge=0.0, lt=1.0)
    stream_input: str = "paper"
    token_map_rank: int = 0


def resolve_settings(streams_path: str | None, base_model: str, base_architecture: str,
                     num_speculative_tokens: int | None, check_fingerprint: bool = True,
                     ) -> tuple[SpecStreamSettings, int, str]:
    """Validate a stream checkpoint against the served model.

    Returns the settings, the number of tokens to draft and the MSA architecture name.
    ``streams_path`` may be None when the served model directory carries its streams
    (fine-tuned mode).
    """
    if base_architecture not in MSA_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"specstream does not support architecture {base_architecture} yet; supported: "
            f"{sorted(MSA_ARCHITECTURES)}. Add an MSA model under model_patches/.")
    if streams_path is None:
        if not (Path(base_model) / STREAMS_SUBDIR).is_dir():
            raise CheckpointError(
                "speculative_config for method 'specstream' needs \"model\": the stream "
                f"checkpoint directory (or serve a fine-tuned model whose directory has a "
                f"'{STREAMS_SUBDIR}/' folder; {base_model} has none)")
        streams_path = base_model
    ckpt_dir = resolve_checkpoint_dir(streams_path)
    cfg = load_checkpoint_config(ckpt_dir)
    if num_speculative_tokens is None:
        num_speculative_tokens = cfg.num_streams
    # tensors too (1-3 MB): a shape that does not match the config fails here, in one line,
    # not in a worker after the engine has started
    load_checkpoint(ckpt_dir, base_model_dir=base_model, num_speculative_tokens=num_speculative_tokens,
                    check_fingerprint=check_fingerprint)
    if cfg.base_model.architecture != base_architecture:
        raise CheckpointError(
            f"stream checkpoint {ckpt_dir} was trained for a {cfg.base_model.architecture} "
            f"but the served model is a {base_architecture}")
    lora = cfg.lora
    settings = SpecStreamSettings(
        checkpoint=str(ckpt_dir.resolve()),
        num_streams=num_speculative_tokens,
        num_stream_layers=cfg.num_stream_layers,
        num_layers=cfg.base_model.num_hidden_layers,
        lora_rank=lora.rank if lora else 0,
        lora_scaling=lora.scaling if lora else 1.0,
        lora_targets=tuple(lora.target_modules) if lora else (),
        min_draft_prob=_min_draft_prob(cfg.speculators_config.greedy_proposal().min_draft_prob),
        stream_input=cfg.stream_input,
        token_map_rank=cfg.token_map_rank or 0,
    )
    return settings, num_speculative_tokens, MSA_ARCHITECTURES[base_architecture][0]


def _min_draft_prob(from_checkpoint: float) -> float:
    raw = os.environ.get(MIN_DRAFT_PROB_ENV)
    if raw is None or raw == "":
        return from_checkpoint
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{MIN_DRAFT_PROB_ENV}={raw!r} must be a probability in [0, 1) "
                         "(0 drafts every stream; higher values cut low-confidence drafts)")
    return value


class DraftPolicySettings(BaseModel):
    """How each request's draft length is chosen (vllm_integration/draft_policy.py);
    travels to the workers in ``hf_config.specstream_policy``.

    ``auto`` (default): per request and step, the length that maximises expected tokens
    per second from the calibrated stream probabilities and the measured step costs,
    zero when nothing pays. ``fixed``: every stream, cut at ``min_draft_prob``; the default
    when ``SPECSTREAM_MIN_DRAFT_PROB`` is set and no policy is named.
    ``cost_scale`` / ``force_off_steps`` are test knobs (environment only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["auto", "fixed"] = "auto"
    cost_scale: float = Field(1.0, gt=0.0)
    force_off_steps: int = Field(0, ge=0)
    force_off_from: int = Field(0, ge=0)


def resolve_policy(extra: dict | None) -> DraftPolicySettings:
    """``extra``: our keys popped from the user's speculative config (see POLICY_KEYS)."""
    raw = dict(extra or {})
    unknown = set(raw) - set(POLICY_KEYS)
    if unknown:
        raise ValueError(f"unknown specstream speculative-config keys {sorted(unknown)}")
    values: dict = {}
    if os.environ.get(MIN_DRAFT_PROB_ENV):  # an explicit cut (SpeculativeEngine(min_draft_prob=))
        values["mode"] = "fixed"            # means the fixed policy, unless one is named below
    if raw.get("draft_policy") is not None:
        values["mode"] = raw["draft_policy"]
    if os.environ.get(DRAFT_POLICY_ENV):
        values["mode"] = os.environ[DRAFT_POLICY_ENV]
    if os.environ.get("SPECSTREAM_POLICY_COST_SCALE"):
        values["cost_scale"] = float(os.environ["SPECSTREAM_POLICY_COST_SCALE"])
    if os.environ.get("SPECSTREAM_POLICY_FORCE_OFF_STEPS"):  # "N" or "START:N"
        *start, count = os.environ["SPECSTREAM_POLICY_FORCE_OFF_STEPS"].split(":")
        values["force_off_steps"] = int(count)
        values["force_off_from"] = int(start[0]) if start else 0
    try:
        return DraftPolicySettings(**values)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ValueError(f"specstream draft_policy: {msg} (\"draft_policy\" is \"auto\" or "
                         f"\"fixed\"; {DRAFT_POLICY_ENV} overrides it)") from None
