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
from ..families import check_variant
from specstream_vllm.model_patches import MSA_ARCHITECTURES

METHOD = "specstream"
#: overrides the checkpoint's ``min_draft_prob`` (see checkpoint.GreedyProposal)
MIN_DRAFT_PROB_ENV = "SPECSTREAM_MIN_DRAFT_PROB"
#: overrides the speculative config's ``draft_policy`` ("auto" | "fixed")
DRAFT_POLICY_ENV = "SPECSTREAM_DRAFT_POLICY"
#: overrides the speculative config's ``match`` ("suffix" | "ngram" | "none")
MATCH_ENV = "SPECSTREAM_MATCH"
#: overrides the speculative config's ``draft_precision`` ("auto" | "exact" | "bfloat16")
DRAFT_PRECISION_ENV = "SPECSTREAM_DRAFT_PRECISION"
#: speculative-config keys of ours that vLLM's SpeculativeConfig does not know
POLICY_KEYS = ("draft_policy", "match", "match_tokens", "draft_precision")
DRAFT_PRECISIONS = ("auto", "exact", "bfloat16")
MATCH_SOURCES = ("suffix", "ngram", "none")
#: the match source when neither the speculative config nor the checkpoint names one
DEFAULT_MATCH = "suffix"


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
    #: the stream pass's linear weights: ``exact`` (the served model's own, the draft equals
    #: the float32 reference's), ``bfloat16`` (a bf16 copy of the stream layers' weights and
    #: the draft head: half the bytes a pass reads; drafts may differ from the reference in
    #: near-ties, verification, hence the output, is unchanged) or ``auto`` (bfloat16 when
    #: a float32 model is served on a CPU with native bf16 dot products, else exact; the
    #: worker decides, model_patches/stream_layers.py)
    draft_precision: Literal["auto", "exact", "bfloat16"] = "auto"


def resolve_draft_precision(extra: dict | None) -> str:
    """``SPECSTREAM_DRAFT_PRECISION`` > the speculative config's ``draft_precision`` > auto."""
    raw = os.environ.get(DRAFT_PRECISION_ENV) or (extra or {}).get("draft_precision") or "auto"
    if raw not in DRAFT_PRECISIONS:
        raise ValueError(f"specstream draft_precision: {raw!r} is not one of "
                         f"{list(DRAFT_PRECISIONS)} (\"draft_precision\" in the speculative "
                         f"config; {DRAFT_PRECISION_ENV} overrides it)")
    return raw


def resolve_settings(streams_path: str | None, base_model: str, base_architecture: str,
                     num_speculative_tokens: int | None, check_fingerprint: bool = True,
                     base_config=None, draft_precision: str = "auto",
                     ) -> tuple[SpecStreamSettings, int, str]:
    """Validate a stream checkpoint against the served model.

    Returns the settings, the number of tokens to draft and the MSA architecture name.
    ``streams_path`` may be None when the served model directory carries its streams
    (fine-tuned mode). ``base_config``: the served model's HF config (variant checks).
    """
    if base_architecture not in MSA_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"specstream does not support architecture {base_architecture} yet; supported: "
            f"{sorted(MSA_ARCHITECTURES)}. Add an MSA model under model_patches/.")
    if base_config is not None:  # variants of a supported family the stream pass does not model
        check_variant(base_config, base_architecture)
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
        draft_precision=draft_precision,
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


class MatchSettings(BaseModel):
    """Drafts matched in the request's own text (vllm_integration/match_source.py), a second
    candidate beside the streams' for every request and step; travels with the policy.

    ``source``: ``suffix`` (arctic-inference's suffix trees over the prompt and earlier
    responses, as vLLM's ``suffix`` method uses them), ``ngram`` (vLLM's n-gram lookup in
    the request's context) or ``none``. ``max_tokens``: the longest match draft (the
    speculative config's ``match_tokens``; default ``num_speculative_tokens``; more than the
    streams' γ widens vLLM's ``num_speculative_tokens`` for match drafts only). The suffix
    and n-gram knobs are vLLM's own speculative-config fields (``suffix_decoding_*``,
    ``prompt_lookup_min``/``prompt_lookup_max``), read from the same dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["suffix", "ngram", "none"] = DEFAULT_MATCH
    max_tokens: int = Field(1, ge=1)
    suffix_max_tree_depth: int = Field(24, ge=1)
    suffix_max_cached_requests: int = Field(10000, ge=0)
    suffix_max_spec_factor: float = Field(1.0, ge=0.0)
    suffix_min_token_prob: float = Field(0.1, ge=0.0, le=1.0)
    ngram_min: int = Field(2, ge=1)
    ngram_max: int = Field(5, ge=1)


class DraftPolicySettings(BaseModel):
    """How each request's draft length is chosen (vllm_integration/draft_policy.py);
    travels to the workers in ``hf_config.specstream_policy``.

    ``auto`` (default): per request and step, the length that maximises expected tokens
    per second from the calibrated stream probabilities and the measured step costs,
    zero when nothing pays. ``fixed``: every stream, cut at ``min_draft_prob``; the default
    when ``SPECSTREAM_MIN_DRAFT_PROB`` is set and no policy is named.
    ``cost_scale`` / ``force_off_steps`` / ``realized_guard`` / ``guard_target`` /
    ``match_budget`` / ``drain_value`` are test
    knobs (environment only; ``SPECSTREAM_POLICY_REALIZED_GUARD=0`` and
    ``SPECSTREAM_POLICY_MATCH_BUDGET=0`` are the ablations of vllm_integration/realized_guard.py
    and match_budget.py; ``SPECSTREAM_POLICY_DRAIN_VALUE=1`` turns on batch_turnover.py's
    pricing, measured slower at batch 4 and no faster at 16)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["auto", "fixed"] = "auto"
    cost_scale: float = Field(1.0, gt=0.0)
    force_off_steps: int = Field(0, ge=0)
    force_off_from: int = Field(0, ge=0)
    realized_guard: bool = True
    guard_target: float | None = Field(None, gt=0.5, lt=2.0)
    match_budget: bool = True
    drain_value: bool = False
    match: MatchSettings = MatchSettings(source="none")


def check_match_tokens(tokens) -> None:
    """The one rule for ``match_tokens`` (speculative config and SpeculativeEngine)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= 64:
        raise ValueError(f"specstream match_tokens must be an integer in 1..64, got {tokens!r}")


def resolve_match(extra: dict | None, num_speculative_tokens: int, *,
                  checkpoint_match: str | None = None, vllm_fields: dict | None = None,
                  ) -> MatchSettings:
    """The match source: ``SPECSTREAM_MATCH`` > the speculative config's ``match`` > the
    checkpoint's default proposal > DEFAULT_MATCH. ``vllm_fields``: vLLM's own suffix /
    prompt-lookup fields of the same speculative config (None where the user gave none)."""
    raw = dict(extra or {})
    source = os.environ.get(MATCH_ENV) or raw.get("match") or checkpoint_match or DEFAULT_MATCH
    if source not in MATCH_SOURCES:
        raise ValueError(f"specstream match: {source!r} is not one of {list(MATCH_SOURCES)} "
                         f"(\"match\" in the speculative config; {MATCH_ENV} overrides it)")
    tokens = raw.get("match_tokens")
    if tokens is None:
        tokens = num_speculative_tokens
    check_match_tokens(tokens)
    values = {k: v for k, v in (vllm_fields or {}).items() if v is not None}
    lo, hi = values.pop("ngram_min", None), values.pop("ngram_max", None)
    if lo is not None or hi is not None:  # vLLM's rule: one given sets both
        values["ngram_min"], values["ngram_max"] = (lo or hi), (hi or lo)
        if values["ngram_min"] > values["ngram_max"]:
            raise ValueError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
    try:
        return MatchSettings(source=source, max_tokens=tokens, **values)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ValueError(f"specstream match settings: {msg}") from None


def resolve_policy(extra: dict | None, match: MatchSettings | None = None) -> DraftPolicySettings:
    """``extra``: our keys popped from the user's speculative config (see POLICY_KEYS);
    ``match``: from :func:`resolve_match` (no match source when None)."""
    raw = dict(extra or {})
    unknown = set(raw) - set(POLICY_KEYS)
    if unknown:
        raise ValueError(f"unknown specstream speculative-config keys {sorted(unknown)}")
    values: dict = {"match": match or MatchSettings(source="none")}
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
    if os.environ.get("SPECSTREAM_POLICY_GUARD_TARGET"):     # ablation of the guard's bar
        values["guard_target"] = float(os.environ["SPECSTREAM_POLICY_GUARD_TARGET"])
    for key, env in (("realized_guard", "SPECSTREAM_POLICY_REALIZED_GUARD"),
                     ("match_budget", "SPECSTREAM_POLICY_MATCH_BUDGET"),
                     ("drain_value", "SPECSTREAM_POLICY_DRAIN_VALUE")):     # ablation switches
        if os.environ.get(env):
            values[key] = os.environ[env] not in ("0", "false")
    try:
        return DraftPolicySettings(**values)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ValueError(f"specstream draft_policy: {msg} (\"draft_policy\" is \"auto\" or "
                         f"\"fixed\"; {DRAFT_POLICY_ENV} overrides it)") from None
