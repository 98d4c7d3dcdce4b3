"""The API benchmark's baseline: the same engine settings without speculation, timed as the
speculative side is timed (``engine._timed_runs``), in its own process.

Run through the package's engine job: ``{"call": "specstream_vllm.api._baseline:measure", ...}``.
"""
from __future__ import annotations


def measure(job: dict) -> dict:
    """Rates per run, outputs of the last run, peak RSS while timed and lifetime peak (VmHWM)."""
    from vllm import LLM  # import before measuring the base RSS, as the speculative side does

    from ._memory import PeakSampler, children_hwm, owner_rss
    from .engine import _timed_runs

    base_rss = owner_rss()
    llm = LLM(**job["llm_kwargs"])
    rates, outputs, extra = _timed_runs(llm, job["prompt_ids"], job["num_runs"], job["max_new_tokens"],
                                        job["temperature"], job["warmup"], counters=False,
                                        sampler=PeakSampler(base_rss))
    return {"rates": rates, "outputs": outputs, "peak_rss": extra["peak_rss"], "hwm": children_hwm()}
