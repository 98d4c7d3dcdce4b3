"""The benchmark's baseline: the same engine settings without speculation, in its own process.

Usage: python -m specstream_vllm.api._baseline JOB.json OUT.json
"""
from __future__ import annotations

import json
import sys


def main(job_path: str, out_path: str) -> None:
    job = json.loads(open(job_path).read())
    from vllm import LLM  # import before measuring the base RSS, as the speculative side does

    from ._memory import PeakSampler, children_hwm, owner_rss
    from .engine import _timed_runs

    base_rss = owner_rss()
    llm = LLM(**job["llm_kwargs"])
    rates, outputs, extra = _timed_runs(llm, job["prompt_ids"], job["num_runs"], job["max_new_tokens"],
                                        job["temperature"], job["warmup"], counters=False,
                                        sampler=PeakSampler(base_rss))
    out = {"rates": rates, "outputs": outputs, "peak_rss": extra["peak_rss"], "hwm": children_hwm()}
    with open(out_path, "w") as f:
        json.dump(out, f)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
