"""Engine-core scheduler: what the front end's spec-decode metrics need from each step.

* ``make_stats``: a decode step in which no request had drafts still reports an (empty)
  ``SpecDecodingStats`` (vLLM reports nothing), so steps without speculation are counted.
* ``update_draft_token_ids`` / ``update_draft_token_ids_in_output``: drop the -1 that pads a
  request's drafts in the proposer's device tensor (a fixed width per step, per-request
  lengths), and remember which source (streams or the match source) made each request's
  drafts (the runner sends them along).
* ``make_spec_decoding_stats``: vLLM's own per-request accounting of verified drafts is
  also added to ``SpecDecodingStats.specstream_sources`` under that source.
* ``schedule`` / ``update_from_output``: timing spans with ``SPECSTREAM_PROFILE`` (read in
  ``__init__``), and ``update_from_output`` marks decode steps for ``make_stats``.
"""
from __future__ import annotations

from ... import envs
from ..patching import Patch
from .config import is_specstream

VLLM_SYMBOLS = (
    "vllm.v1.spec_decode.metrics:SpecDecodingStats.new",
)

_TIMER = "_specstream_timer"
_DECODE_STEP = "_specstream_decode_step"
_SOURCES = "_specstream_sources"


def _drop_padding(draft_token_ids) -> None:
    """Per request, its drafts without the trailing -1s (the device tensor's padding)."""
    rows = draft_token_ids.draft_token_ids
    for i, d in enumerate(rows):
        if d and d[-1] < 0:
            cut = len(d)
            while cut and d[cut - 1] < 0:
                cut -= 1
            rows[i] = d[:cut]


def _remember_sources(scheduler, draft_token_ids) -> None:
    """The sources of the drafts just handed to the scheduler (the next step verifies
    them); only the requests in this batch (finished ones drop out)."""
    sources = getattr(draft_token_ids, "specstream_sources", None)
    if sources is None:
        return
    scheduler.__dict__[_SOURCES] = {r: s for r, s, d in zip(
        draft_token_ids.req_ids, sources, draft_token_ids.draft_token_ids) if s is not None and len(d)}


class SchedulerPatch(Patch):
    target_name = "vllm.v1.core.sched.scheduler:Scheduler"

    def __init__(self, *args, **kwargs):
        SchedulerPatch.original("__init__")(self, *args, **kwargs)
        if envs.is_set("SPECSTREAM_PROFILE"):
            from ..profiling import timer
            self.__dict__[_TIMER] = timer("core")

    def schedule(self, *args, **kwargs):
        timer = self.__dict__.get(_TIMER)
        if timer is None:
            return SchedulerPatch.original("schedule")(self, *args, **kwargs)
        with timer.span("schedule"):
            return SchedulerPatch.original("schedule")(self, *args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        if is_specstream(self.vllm_config.speculative_config):
            spec = scheduler_output.scheduled_spec_decode_tokens
            n = scheduler_output.num_scheduled_tokens
            self.__dict__[_DECODE_STEP] = bool(n) and (
                scheduler_output.total_num_scheduled_tokens
                == len(n) + sum(len(v) for v in spec.values()))
        orig = SchedulerPatch.original("update_from_output")
        timer = self.__dict__.get(_TIMER)
        if timer is None:
            return orig(self, scheduler_output, model_runner_output)
        with timer.span("update_from_output"):
            out = orig(self, scheduler_output, model_runner_output)
        timer.step_done()
        return out

    def make_stats(self, spec_decoding_stats=None, *args, **kwargs):
        if (spec_decoding_stats is None and self.log_stats
                and self.__dict__.pop(_DECODE_STEP, False)):
            from vllm.v1.spec_decode.metrics import SpecDecodingStats
            spec_decoding_stats = SpecDecodingStats.new(self.num_spec_tokens)
        self.__dict__.pop(_DECODE_STEP, None)
        return SchedulerPatch.original("make_stats")(self, spec_decoding_stats, *args, **kwargs)

    def update_draft_token_ids(self, draft_token_ids):
        _drop_padding(draft_token_ids)
        _remember_sources(self, draft_token_ids)
        return SchedulerPatch.original("update_draft_token_ids")(self, draft_token_ids)

    def update_draft_token_ids_in_output(self, draft_token_ids, scheduler_output):
        _drop_padding(draft_token_ids)
        _remember_sources(self, draft_token_ids)
        return SchedulerPatch.original("update_draft_token_ids_in_output")(
            self, draft_token_ids, scheduler_output)

    def make_spec_decoding_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                                 num_invalid_spec_tokens, request_id):
        out = SchedulerPatch.original("make_spec_decoding_stats")(
            self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
            num_invalid_spec_tokens, request_id)
        source = self.__dict__.get(_SOURCES, {}).get(request_id)
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




def apply() -> None:
    SchedulerPatch.apply_when_imported()
