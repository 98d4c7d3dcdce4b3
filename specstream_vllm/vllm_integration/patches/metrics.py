"""Front-end spec-decode metrics of specstream engines: ``/metrics`` and the stats log.

``SpecDecodingStats`` gains a real dataclass field, ``specstream_sources`` (source ->
[drafts, draft tokens, accepted tokens] of the step), so vLLM's msgpack encoding carries it
from the engine core to the front end. ``SpecDecodingProm`` adds the counters
``vllm:spec_decode_specstream_steps_total``, ``..._steps_without_drafts_total`` (mean
draft tokens per step = ``vllm:spec_decode_num_draft_tokens_total`` / steps) and, labelled
by ``source``, ``..._source_drafts``, ``..._source_draft_tokens`` and
``..._source_accepted_tokens``. ``SpecDecodingLogging`` adds the line "specstream draft
policy: ..." (steps without speculation, draft tokens per step, acceptance by source).
Only engines serving ``specstream`` get any of it.
"""
from __future__ import annotations

import dataclasses
import logging

from ..patching import Patch, when_imported
from .config import is_specstream

VLLM_SYMBOLS = (
    "vllm.v1.spec_decode.metrics:SpecDecodingStats",
    "vllm.v1.metrics.utils:create_metric_per_engine",
)


def add_stats_field() -> None:
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

    target_name = "vllm.v1.spec_decode.metrics:SpecDecodingProm"

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

    target_name = "vllm.v1.spec_decode.metrics:SpecDecodingLogging"

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
        log_fn = log_fn or logging.getLogger("vllm.v1.spec_decode.metrics").info
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




def _apply_now() -> None:
    add_stats_field()
    SpecDecodingPromPatch.apply_once()
    SpecDecodingLoggingPatch.apply_once()


def apply() -> None:
    when_imported("vllm.v1.spec_decode.metrics", _apply_now)
