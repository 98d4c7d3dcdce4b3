"""The ``specstream`` speculative settings, validated at the edge (front-end process).

Everything a user can get wrong is checked here, before any worker starts, and the
result is a plain dict that travels to the workers inside ``hf_config.specstream``.
The user's keys and their environment overrides are specstream_vllm/options.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import envs
from ..checkpoint import (STREAMS_SUBDIR, attends_streams, load_checkpoint, load_checkpoint_config,
                          reads_tokens, resolve_checkpoint_dir)
from ..errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from ..families import check_variant
# METHOD, DEFAULT_MATCH and resolve_options are read from here by the patches and benchmarks
from ..options import (DEFAULT_MATCH, SUFFIX_MATCH_TOKENS, METHOD, OPTION_KEYS, SpecStreamOptions, VllmSpeculativeKeys,
                       match_source, resolve_options)
from specstream_vllm.model_patches import FUSED_PASS_ARCHITECTURES, MSA_ARCHITECTURES

#: speculative-config keys of ours that vLLM's SpeculativeConfig does not know
POLICY_KEYS = OPTION_KEYS
_VLLM_DEFAULTS = {k: f.default for k, f in VllmSpeculativeKeys.model_fields.items()}


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
    #: the float32 reference's), ``int8`` / ``bfloat16`` (a copy of the stream layers' weights
    #: and the draft head in that type: a quarter / half of float32's bytes a pass reads;
    #: drafts may differ from the reference in near-ties, verification, hence the output, is
    #: unchanged) or ``auto`` (on a CPU int8 with native int8 dot products, else bfloat16
    #: with native bf16 ones, else the served dtype; the worker decides,
    #: model_patches/stream_layers.py)
    draft_precision: Literal["auto", "exact", "bfloat16", "int8"] = "auto"
    #: where the streams run: ``separate`` (after verification), ``fused`` (inside the
    #: verification forward) or ``auto`` (per batch-size bucket, measured); only the
    #: ``anchor`` form (query-only streams) can be fused, so other forms get ``separate``
    draft_pass: Literal["separate", "fused", "auto"] = "separate"


def resolve_settings(streams_path: str | None, base_model: str, base_architecture: str,
                     num_speculative_tokens: int | None, check_fingerprint: bool = True,
                     base_config=None, options: Optional[SpecStreamOptions] = None,
                     ) -> tuple[SpecStreamSettings, int, str]:
    """Validate a stream checkpoint against the served model.

    Returns the settings, the number of tokens to draft and the MSA architecture name.
    ``streams_path`` may be None when the served model directory carries its streams
    (fine-tuned mode). ``base_config``: the served model's HF config (variant checks).
    ``options``: from :func:`resolve_options` (the speculative config's keys of ours).
    """
    options = options if options is not None else resolve_options(None)
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
        min_draft_prob=(options.min_draft_prob if options.min_draft_prob is not None
                        else cfg.speculators_config.greedy_proposal().min_draft_prob),
        stream_input=cfg.stream_input,
        token_map_rank=cfg.token_map_rank or 0,
        draft_precision=options.draft_precision,
        draft_pass=resolve_draft_pass(options.draft_pass, cfg.stream_input, ckpt_dir,
                                      base_architecture),
    )
    return settings, num_speculative_tokens, MSA_ARCHITECTURES[base_architecture][0]


def resolve_draft_pass(draft_pass: str, stream_input: str, ckpt_dir, architecture: str) -> str:
    """The draft pass in effect: ``auto`` is ``separate`` for forms whose streams attend
    to streams (they cannot ride in the verification forward); ``fused`` with such a form,
    or with a family the fused pass does not cover, is a start-up error."""
    if not attends_streams(stream_input):
        if draft_pass == "fused" and architecture not in FUSED_PASS_ARCHITECTURES:
            raise ConfigError(
                f"\"draft_pass\": \"fused\" is not supported for {architecture} (fused: "
                f"{', '.join(sorted(FUSED_PASS_ARCHITECTURES))}); use \"draft_pass\": \"separate\"")
        return draft_pass if architecture in FUSED_PASS_ARCHITECTURES else "separate"
    if draft_pass == "fused":
        raise ConfigError(
            f"\"draft_pass\": \"fused\" needs a stream checkpoint of the anchor form; "
            f"{ckpt_dir} is of the {stream_input} form (its streams "
            f"{'read the token sampled after verification' if reads_tokens(stream_input) else 'attend to each other'}"
            f"): use an anchor checkpoint, or \"draft_pass\": \"separate\"")
    return "separate"


class MatchSettings(BaseModel):
    """Drafts matched in the request's own text (vllm_integration/match_source.py), a second
    candidate beside the streams' for every request and step; travels with the policy.

    ``source``: ``suffix`` (arctic-inference's suffix trees over the prompt and earlier
    responses, as vLLM's ``suffix`` method uses them), ``ngram`` (vLLM's n-gram lookup in
    the request's context) or ``none``. ``max_tokens``: the longest match draft (the
    speculative config's ``match_tokens``; default ``num_speculative_tokens``, for ``suffix``
    at least SUFFIX_MATCH_TOKENS; more than the
    streams' γ widens vLLM's ``num_speculative_tokens`` for match drafts only). The suffix
    and n-gram knobs are vLLM's own speculative-config fields (``suffix_decoding_*``,
    ``prompt_lookup_min``/``prompt_lookup_max``), read from the same dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["suffix", "ngram", "none"] = DEFAULT_MATCH
    max_tokens: int = Field(1, ge=1)
    suffix_max_tree_depth: int = Field(_VLLM_DEFAULTS["suffix_decoding_max_tree_depth"], ge=1)
    suffix_max_cached_requests: int = Field(_VLLM_DEFAULTS["suffix_decoding_max_cached_requests"], ge=0)
    suffix_max_spec_factor: float = Field(_VLLM_DEFAULTS["suffix_decoding_max_spec_factor"], ge=0.0)
    suffix_min_token_prob: float = Field(_VLLM_DEFAULTS["suffix_decoding_min_token_prob"], ge=0.0, le=1.0)
    ngram_min: int = Field(_VLLM_DEFAULTS["prompt_lookup_min"], ge=1)
    ngram_max: int = Field(_VLLM_DEFAULTS["prompt_lookup_max"], ge=1)


class DraftPolicySettings(BaseModel):
    """How each request's draft length is chosen (specstream_vllm/policy/);
    travels to the workers in ``hf_config.specstream_policy``.

    ``auto`` (default): per request and step, the length that maximises expected tokens
    per second from the calibrated stream probabilities and the measured step costs,
    zero when nothing pays. ``fixed``: every stream, cut at ``min_draft_prob``; the default
    when ``min_draft_prob`` is given and no policy is named.
    ``cost_scale`` / ``force_off_steps`` / ``realized_guard`` / ``match_budget`` are test
    knobs (environment only; ``SPECSTREAM_POLICY_REALIZED_GUARD=0`` and
    ``SPECSTREAM_POLICY_MATCH_BUDGET=0`` are the ablations of policy/guard.py and
    policy/budget.py; ``SPECSTREAM_POLICY_STREAMS=0`` leaves the drafting to the match
    source)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mode: Literal["auto", "fixed"] = "auto"
    cost_scale: float = Field(1.0, gt=0.0)
    force_off_steps: int = Field(0, ge=0)
    force_off_from: int = Field(0, ge=0)
    realized_guard: bool = True
    match_budget: bool = True
    streams: bool = True
    match: MatchSettings = MatchSettings(source="none")


Options = Union[SpecStreamOptions, dict, None]


def resolve_match(options: Options, num_speculative_tokens: int, *,
                  checkpoint_match: str | None = None, vllm_fields: dict | None = None,
                  ) -> MatchSettings:
    """The match source: ``match`` of the options (environment included) > the checkpoint's
    default proposal > DEFAULT_MATCH; its package must import here, in the front end.
    ``options``: from :func:`resolve_options` (a dict of the user's keys is resolved here).
    ``vllm_fields``: vLLM's own suffix / prompt-lookup fields of the same speculative
    config (None where the user gave none)."""
    options = resolve_options(options)
    source = match_source(options, checkpoint_match)
    tokens = options.match_tokens or (max(num_speculative_tokens, SUFFIX_MATCH_TOKENS)
                                      if source == "suffix" else num_speculative_tokens)
    values = {k: v for k, v in (vllm_fields or {}).items() if v is not None}
    lo, hi = values.pop("ngram_min", None), values.pop("ngram_max", None)
    if lo is not None or hi is not None:  # vLLM's rule: one given sets both
        values["ngram_min"], values["ngram_max"] = (lo or hi), (hi or lo)
        if values["ngram_min"] > values["ngram_max"]:
            raise ConfigError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
    try:
        return MatchSettings(source=source, max_tokens=tokens, **values)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"specstream match settings: {msg}") from None


def resolve_policy(options: Options, match: MatchSettings | None = None) -> DraftPolicySettings:
    """``options``: from :func:`resolve_options` (a dict of the user's keys is resolved
    here); ``match``: from :func:`resolve_match` (no match source when None). The debug
    switches of the policy (envs.py) are read here, now."""
    options = resolve_options(options)
    values: dict = {"match": match or MatchSettings(source="none")}
    # an explicit cut without a named policy means the fixed policy
    values["mode"] = options.draft_policy or ("fixed" if options.min_draft_prob is not None else "auto")
    if envs.is_set("SPECSTREAM_POLICY_COST_SCALE"):
        values["cost_scale"] = envs.get("SPECSTREAM_POLICY_COST_SCALE")
    if envs.is_set("SPECSTREAM_POLICY_FORCE_OFF_STEPS"):
        values["force_off_from"], values["force_off_steps"] = envs.get("SPECSTREAM_POLICY_FORCE_OFF_STEPS")
    for key, env in (("realized_guard", "SPECSTREAM_POLICY_REALIZED_GUARD"),
                     ("match_budget", "SPECSTREAM_POLICY_MATCH_BUDGET"),
                     ("streams", "SPECSTREAM_POLICY_STREAMS")):     # ablation switches
        if envs.is_set(env):
            values[key] = envs.get(env)
    try:
        return DraftPolicySettings(**values)
    except ValidationError as exc:
        msg = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(f"specstream draft policy settings: {msg}") from None
