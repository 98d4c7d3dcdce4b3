"""Model runner: ``GPUModelRunner`` (``CPUModelRunner`` subclasses it) drafts with our
proposer.

* ``__init__``: vLLM's own constructor runs with a method it knows ("ngram": no draft
  model, no EAGLE buffers), then the drafter is replaced by ``SpecStreamProposer``, the aux
  hidden state (the input of layer L-N_s) is requested from the target's forward, and a
  step clock is attached. ``SPECSTREAM_PROFILE`` is read here, once per runner.
* ``execute_model``: starts each step's clock record (the draft policy's measured cost).
* ``_build_attention_metadata`` / ``_model_forward``: the step's common attention metadata
  is kept for the proposer, which wraps the target's forward (the fused draft pass:
  stream rows ride inside it).
* ``propose_draft_token_ids``: routes to the proposer and keeps each request's draft
  source beside its drafts.
* ``_sample``: a step without any draft skips the rejection sampler (see below).
* ``take_draft_token_ids``: hands the sources to the engine core with the draft ids.
* ``_copy_draft_token_ids_to_cpu``: on a CPU, the proposer's device tensor of drafts is
  copied without vLLM's CUDA stream (which a CPU build of torch does not have); elsewhere
  vLLM's own copy runs.
* ``sample_tokens``: a timing span only (with ``SPECSTREAM_PROFILE``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ... import envs
from ..patching import Patch
from ..runner_view import CLOCK_ATTR, SOURCES_ATTR as _SOURCES
from ..step_clock import StepClock
from .config import is_specstream

VLLM_SYMBOLS = (
    "vllm.distributed.parallel_state:get_pp_group",
    "vllm.v1.sample.sampler:Sampler.forward",
    "vllm.v1.worker.gpu_input_batch:InputBatch.update_async_output_token_ids",
)

_TIMER = "_specstream_timer"
#: during execute_model: (the scheduler output, the step's common attention metadata)
_STEP = "_specstream_step"


@contextmanager
def _method_as(spec_config, stand_in: str):
    """Let vLLM's own runner __init__ run its if/elif with a method it knows."""
    real = spec_config.method
    object.__setattr__(spec_config, "method", stand_in)
    try:
        yield
    finally:
        object.__setattr__(spec_config, "method", real)


def _timed(runner, span: str, fn, *args, **kwargs):
    timer = runner.__dict__.get(_TIMER)
    if timer is None:
        return fn(runner, *args, **kwargs)
    with timer.span(span):
        return fn(runner, *args, **kwargs)


class GPUModelRunnerPatch(Patch):
    target_name = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"

    def __init__(self, vllm_config, device, *args, **kwargs):
        orig = GPUModelRunnerPatch.original("__init__")
        spec = vllm_config.speculative_config
        if not is_specstream(spec):
            orig(self, vllm_config, device, *args, **kwargs)
        else:
            with _method_as(spec, "ngram"):
                orig(self, vllm_config, device, *args, **kwargs)
            from vllm.distributed.parallel_state import get_pp_group

            from ..proposer import SpecStreamProposer
            if get_pp_group().is_last_rank:
                self.drafter = SpecStreamProposer(vllm_config, device, self)
            self.use_aux_hidden_state_outputs = True
            self.__dict__[CLOCK_ATTR] = StepClock()
        if envs.is_set("SPECSTREAM_PROFILE"):   # any method: baselines are profiled too
            from ..profiling import timer
            self.__dict__[_TIMER] = timer("worker")

    def execute_model(self, scheduler_output, *args, **kwargs):
        clock = self.__dict__.get(CLOCK_ATTR)
        if clock is None:
            return _timed(self, "execute_model", GPUModelRunnerPatch.original("execute_model"),
                          scheduler_output, *args, **kwargs)
        clock.start(scheduler_output)
        self.__dict__[_SOURCES] = {}   # this step's drafts get theirs in propose
        self.__dict__[_STEP] = [scheduler_output, None]
        try:
            return _timed(self, "execute_model", GPUModelRunnerPatch.original("execute_model"),
                          scheduler_output, *args, **kwargs)
        finally:
            self.__dict__.pop(_STEP, None)

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, *args, **kwargs):
        GPUModelRunnerPatch.original("initialize_kv_cache")(self, kv_cache_config, is_profiling,
                                                           *args, **kwargs)
        warm_up = getattr(self.__dict__.get("drafter"), "warm_up", None)
        if warm_up is not None and not is_profiling and is_specstream(self.speculative_config):
            warm_up()           # the compiled stream pass, at start-up rather than in a request

    def _build_attention_metadata(self, *args, **kwargs):
        out = GPUModelRunnerPatch.original("_build_attention_metadata")(self, *args, **kwargs)
        step = self.__dict__.get(_STEP)
        if step is not None:
            step[1] = out[1]
        return out

    def _model_forward(self, *args, **kwargs):
        step = self.__dict__.get(_STEP)
        riding = getattr(self.__dict__.get("drafter"), "riding", None)
        if step is None or riding is None:
            return _timed(self, "target_forward", GPUModelRunnerPatch.original("_model_forward"),
                          *args, **kwargs)
        with riding(*step):
            return _timed(self, "target_forward", GPUModelRunnerPatch.original("_model_forward"),
                          *args, **kwargs)

    def sample_tokens(self, *args, **kwargs):
        out = _timed(self, "sample_tokens", GPUModelRunnerPatch.original("sample_tokens"),
                     *args, **kwargs)
        timer = self.__dict__.get(_TIMER)
        if timer is not None:
            timer.step_done()
        return out

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
        self.__dict__[_SOURCES] = {req_ids[i]: src for i, src in enumerate(sources[:len(req_ids)])
                                   if src is not None}
        return drafts

    def _sample(self, logits, spec_decode_metadata):
        """vLLM 0.32 builds speculative metadata for every step once a speculative method is
        configured, so a step without a single draft (the draft policy's "off") still runs
        the rejection sampler: ~1 ms a step at batch 16 on this CPU, the largest part of what
        speculation cost while it was off. With zero drafts the rejection sampler's result is
        its bonus-token sample, i.e. the sampler over the same logits with
        ``predict_bonus_token``: call that directly."""
        if (spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0
                and is_specstream(self.speculative_config)):
            self.input_batch.update_async_output_token_ids()
            sample = lambda runner: runner.sampler(
                logits=logits, sampling_metadata=runner.input_batch.sampling_metadata,
                predict_bonus_token=True)
            return _timed(self, "sample_and_verify", sample)
        return _timed(self, "sample_and_verify", GPUModelRunnerPatch.original("_sample"),
                      logits, spec_decode_metadata)

    def _copy_draft_token_ids_to_cpu(self, scheduler_output, zeros_only: bool = False):
        drafts = self._draft_token_ids
        if (self.device.type != "cpu" or not torch.is_tensor(drafts)
                or not is_specstream(self.speculative_config)):
            return GPUModelRunnerPatch.original("_copy_draft_token_ids_to_cpu")(
                self, scheduler_output, zeros_only)
        self.prev_num_spec_tokens = drafts.shape[1]
        if self.use_async_scheduling and not (
                scheduler_output.has_structured_output_requests
                or self.input_batch.sampling_metadata.output_token_ids):
            return
        self._draft_token_req_ids = self.input_batch.req_ids.copy()
        n, w = drafts.shape
        if zeros_only:
            self.draft_token_ids_cpu[:n, :w] = 0
        else:
            self.draft_token_ids_cpu[:n, :w].copy_(drafts)

    def take_draft_token_ids(self):
        out = GPUModelRunnerPatch.original("take_draft_token_ids")(self)
        sources = self.__dict__.get(_SOURCES)
        if out is not None and sources is not None:
            # rides with the draft ids to the engine core (same process, or pickled)
            out.specstream_sources = [sources.get(r) for r in out.req_ids]
        return out




def apply() -> None:
    """Once a worker imports the runner (the front end never does: seconds saved)."""
    GPUModelRunnerPatch.apply_when_imported()
