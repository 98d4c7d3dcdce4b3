"""The main job: the embedded default through vLLM with ``specstream`` and without it.

Both engines see the same prompts in the same run (each in its own process); the
figures printed are measured here: output tokens/s of each, their ratio, the mean
acceptance length from vLLM's own spec-decode counters, and how many greedy
outputs are token-identical to the no-speculation run.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .engine_job import run_in_subprocess
from .errors import SpecStreamError
from .spec_counters import SpecCounters

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Give me five tips for writing clean Python code.",
    "What are the main differences between a list and a tuple in Python?",
    "Describe the water cycle in a few sentences.",
    "Write a polite email asking a colleague to review my report.",
    "Summarize the plot of Romeo and Juliet.",
]


def _rate(res: dict) -> tuple[float, int]:
    toks = sum(len(o) for b in res["batches"] for o in b["outputs"])
    secs = sum(b["seconds"] for b in res["batches"])
    return toks / secs, toks


def run_demo(model: str | None = None, streams: str | None = None, gamma: int = 4,
             max_tokens: int = 128, dtype: str = "auto", prompts: list[str] | None = None,
             enforce_eager: bool = False, workdir: str | None = None) -> dict:
    from .assets import shipped_streams_dir
    from .default_model import default_model_dir
    from .dtype_choice import choose_dtype
    from .hardware import cpu_model_name, deciding_flags, device_platform

    platform = device_platform()
    dtype, dtype_reason = choose_dtype(dtype, platform=platform, enforce_eager=enforce_eager)
    cpu = f"{cpu_model_name()} ({deciding_flags()})" if platform == "cpu" else platform

    model = model or str(default_model_dir())
    if streams is None:
        shipped = shipped_streams_dir()
        if shipped is None:
            raise SpecStreamError("no stream checkpoint given and none shipped; pass --streams")
        streams = str(shipped)
    prompts = prompts or DEMO_PROMPTS
    workdir = Path(workdir or tempfile.mkdtemp(prefix="specstream-demo-"))
    warm = [0]
    batches = [warm] + [[i] for i in range(len(prompts))]  # batch 1; first call warms up
    job = {"model": model, "dtype": dtype, "prompts": prompts, "max_tokens": [max_tokens] * len(prompts),
           "batches": batches, "enforce_eager": enforce_eager, "max_model_len": 2048}
    spec = {"method": "specstream", "model": streams, "num_speculative_tokens": gamma}
    print(f"[specstream] model {model}\n[specstream] streams {streams} (γ={gamma}), dtype {dtype}, "
          f"{len(prompts)} prompts, batch 1, up to {max_tokens} new tokens, greedy\n"
          f"[specstream] device {cpu}\n[specstream] dtype {dtype_reason}", flush=True)
    print("[specstream] running vLLM without speculation ...", flush=True)
    base = run_in_subprocess(job, workdir, "baseline")
    print("[specstream] running vLLM with specstream ...", flush=True)
    ours = run_in_subprocess(dict(job, spec=spec), workdir, "specstream")
    for r in (base, ours):
        r["batches"] = r["batches"][1:]  # drop the warm-up call
    base_rate, _ = _rate(base)
    ours_rate, n_tokens = _rate(ours)
    counters = SpecCounters.from_metrics(ours["metrics"])
    mal, per_pos = counters.mean_acceptance_length, counters.per_position_rate
    same = sum(a["outputs"] == b["outputs"] for a, b in zip(base["batches"], ours["batches"]))
    report = {"model": model, "streams": streams, "gamma": gamma, "dtype": dtype,
              "dtype_reason": dtype_reason, "device": cpu,
              "prompts": len(prompts), "max_tokens": max_tokens,
              "baseline_tokens_per_s": round(base_rate, 2),
              "specstream_tokens_per_s": round(ours_rate, 2),
              "speedup": round(ours_rate / base_rate, 3),
              "mean_acceptance_length": round(mal, 3),
              "per_position_acceptance": [round(p, 3) for p in per_pos],
              "greedy_identical_prompts": same, "output_tokens": n_tokens}
    print("\n=== specstream vs vLLM without speculation (same run) ===")
    print(f"  no speculation : {base_rate:8.1f} output tok/s")
    print(f"  specstream     : {ours_rate:8.1f} output tok/s")
    print(f"  speedup        : {ours_rate / base_rate:8.2f}x  (dtype {dtype}, {cpu})")
    print(f"  mean acceptance length (tokens per target forward): {mal:.2f}")
    print(f"  per-position acceptance: {[round(p, 2) for p in per_pos]}")
    print(f"  greedy outputs identical to no speculation: {same}/{len(prompts)} "
          f"({dtype}; in bf16 near-ties can flip, float32 is token-identical)")
    tok_path = workdir / "report.json"
    tok_path.write_text(json.dumps(report, indent=2))
    print(f"  report: {tok_path}")
    first = ours["batches"][0]["outputs"][0]
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model)
        print(f"\n  Q: {prompts[0]}\n  A: {tok.decode(first, skip_special_tokens=True)}")
    except Exception:  # the figures above are the point; decoding is a courtesy
        pass
    return report
