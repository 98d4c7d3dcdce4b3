"""Where the time of a specstream step goes, at batch 1.

Runs MT-Bench first turns one at a time through an engine with ``SPECSTREAM_PROFILE``
set (timing spans recorded inside vLLM's worker and engine core, see
``specstream_vllm/vllm_integration/profiling.py``), for specstream and, for the
reference cost of one plain decoding forward, for vLLM without speculation.

    python -m benchmarks.profile_step --streams DIR --num-prompts 8 --out DIR
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from specstream_vllm.engine_job import run_in_subprocess
from specstream_vllm.vllm_integration.profiling import summarize

from .workloads import load_mtbench


def profile(model: str, spec: dict | None, prompts: list[str], max_tokens: int, dtype: str,
            workdir: Path, name: str) -> dict:
    pdir = workdir / f"profile-{name}"
    job = {"model": model, "dtype": dtype, "prompts": prompts, "max_tokens": [max_tokens] * len(prompts),
           "batches": [[i] for i in range(len(prompts))], "enforce_eager": False,
           "max_model_len": 2048, "spec": spec, "env": {"SPECSTREAM_PROFILE": str(pdir)}}
    res = run_in_subprocess(job, workdir, name)
    return {"summary": summarize(pdir), "metrics": res["metrics"],
            "tokens": sum(len(o) for b in res["batches"] for o in b["outputs"]),
            "seconds": sum(b["seconds"] for b in res["batches"])}


def breakdown(spec_run: dict, base_run: dict) -> dict:
    w = spec_run["summary"]["worker"]
    c = spec_run["summary"].get("core", {})
    ms = lambda d, k: d.get(k, {}).get("ms_per_call", 0.0)  # noqa: E731
    steps = w["sample_tokens"]["calls"]
    verify = ms(w, "target_forward")
    draft = w.get("draft", {}).get("total_s", 0.0) * 1000 / max(steps, 1)
    sample = ms(w, "sample_and_verify")
    runner_other = ms(w, "execute_model") + ms(w, "sample_tokens") - verify - draft - sample
    sched = ms(c, "schedule") + ms(c, "update_from_output")
    base_fwd = ms(base_run["summary"]["worker"], "target_forward")
    return {
        "steps": steps,
        "ms_per_step": {"verify_forward": verify, "draft_pass": draft, "sampling_and_rejection": sample,
                        "runner_other": runner_other, "scheduler": sched},
        "draft_over_verify": draft / verify if verify else None,
        "plain_decode_forward_ms": base_fwd,
        "verify_over_plain_forward": verify / base_fwd if base_fwd else None,
        "tokens_per_step": spec_run["tokens"] / max(steps, 1),
    }


def batch1_parser(prog: str, num_prompts: int) -> argparse.ArgumentParser:
    """Options shared by the batch-1 step profilers (this module, ``draft_cost``)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", default=None)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--num-prompts", type=int, default=num_prompts)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    return ap


def batch1_inputs(a: argparse.Namespace) -> tuple[str, str, list[str]]:
    """Model dir, streams dir (shipped defaults) and the first MT-Bench turns to run."""
    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    prompts = [p.messages[0]["content"] for p in load_mtbench()[: a.num_prompts]]
    return a.model or str(default_model_dir()), a.streams or str(shipped_streams_dir()), prompts


def main(argv=None) -> int:
    ap = batch1_parser("python -m benchmarks.profile_step", num_prompts=8)
    ap.add_argument("--dtype", default="auto",
                    help="auto: bfloat16 on CPUs with AMX bf16, else float32 (specstream_vllm.hardware)")
    a = ap.parse_args(argv)
    from specstream_vllm.dtype_choice import resolve_dtype
    a.dtype = resolve_dtype(a.dtype)
    model, streams, prompts = batch1_inputs(a)
    out = Path(a.out or tempfile.mkdtemp(prefix="specstream-profile-"))
    spec = {"method": "specstream", "model": streams, "num_speculative_tokens": a.gamma}
    base_run = profile(model, None, prompts, a.max_tokens, a.dtype, out, "baseline")
    spec_run = profile(model, spec, prompts, a.max_tokens, a.dtype, out, "specstream")
    result = {"breakdown": breakdown(spec_run, base_run), "specstream": spec_run, "baseline": base_run}
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    b = result["breakdown"]
    print(f"specstream step at batch 1 ({b['steps']} steps, {b['tokens_per_step']:.2f} tokens/step):")
    for k, v in b["ms_per_step"].items():
        print(f"  {k:24s} {v:8.2f} ms")
    print(f"  draft / verify forward   {b['draft_over_verify']:.3f}")
    print(f"  plain decoding forward   {b['plain_decode_forward_ms']:.2f} ms "
          f"(verify costs {b['verify_over_plain_forward']:.2f}x)")
    print(f"  written: {out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
