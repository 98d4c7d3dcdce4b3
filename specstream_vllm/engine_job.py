"""Run one real vLLM engine in a fresh process and write its results as JSON.

The main job and the integration tests give every engine its own process (vLLM on
CPU spawns workers; a subprocess also returns all memory when it ends).
Usage: python -m specstream_vllm.engine_job JOB.json OUT.json
"""
from __future__ import annotations

import json
import os
import sys
import time


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=job["model"], dtype=job.get("dtype", "float32"),
                  enforce_eager=job.get("enforce_eager", True),
                  max_model_len=job.get("max_model_len", 1024), seed=0, disable_log_stats=False,
                  speculative_config=job.get("spec"),
                  tensor_parallel_size=job.get("tp", 1),
                  skip_tokenizer_init=job.get("skip_tokenizer_init", False),
                  max_num_seqs=job.get("max_num_seqs", 16))
    llm = LLM(**kwargs)
    tok = None if job.get("skip_tokenizer_init") else llm.get_tokenizer()
    prompts = []
    for p in job["prompts"]:
        if isinstance(p, list) and p and isinstance(p[0], int):
            prompts.append(TokensPrompt(prompt_token_ids=p))
        else:
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
            prompts.append(TokensPrompt(prompt_token_ids=tok(text, add_special_tokens=False).input_ids))
    max_tokens = job.get("max_tokens", [32] * len(prompts))
    # one temperature for all, or one per prompt (mixed greedy/sampled batches); sampled
    # requests are seeded by their index, so runs are reproducible
    temps = job.get("temperatures") or [job.get("temperature", 0.0)] * len(prompts)
    params = [SamplingParams(temperature=t, max_tokens=m, seed=(1234 + i) if t else None,
                             ignore_eos=job.get("ignore_eos", False))
              for i, (m, t) in enumerate(zip(max_tokens, temps))]
    result: dict = {"batches": []}
    for batch in job.get("batches", [list(range(len(prompts)))]):
        t = time.perf_counter()
        outs = llm.generate([prompts[i] for i in batch], [params[i] for i in batch], use_tqdm=False)
        result["batches"].append({"indices": batch, "seconds": time.perf_counter() - t,
                                  "outputs": [list(o.outputs[0].token_ids) for o in outs],
                                  "metrics": _spec_metrics(llm)})  # cumulative after the batch
    result["metrics"] = _spec_metrics(llm)
    return result


def _spec_metrics(llm) -> dict:
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            key = m.name
            source = (getattr(m, "labels", None) or {}).get("source")
            if source is not None:  # specstream's per-source counters
                key = f"{m.name}{{source={source}}}"
            metrics[key] = getattr(m, "values", None) or getattr(m, "value", None)
    return metrics


def run_in_subprocess(job: dict, workdir, name: str, timeout: float = 1800) -> dict:
    """Run ``job`` in a fresh interpreter; raise with the engine's log tail on failure."""
    import subprocess
    from pathlib import Path

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jp, op, lp = workdir / f"{name}.job.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    jp.write_text(json.dumps(job))
    env = dict(os.environ, **job.get("env", {}))
    with open(lp, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "specstream_vllm.engine_job", str(jp), str(op)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"engine job {name} failed (log: {lp}):\n{lp.read_text()[-5000:]}")
    return json.loads(op.read_text())


if __name__ == "__main__":
    job = json.loads(open(sys.argv[1]).read())
    os.environ.update(job.get("env", {}))
    out = run(job)
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
