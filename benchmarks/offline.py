"""Offline mode: one ``vllm.LLM`` engine per method, each in its own child process.

The parent writes a job JSON, starts ``python -m benchmarks.offline JOB OUT``, samples the child's
process-tree RSS, and reads the result JSON. A failing or crashing engine yields a result with
``status: "failed"`` and the error text; the run goes on with the next method.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .system import PeakRSS

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP_CONVERSATIONS = [
    [{"role": "user", "content": f"Count from {i} to {i + 30}, one number per line."}]
    for i in range(1, 65)]


def engine_env(kv_cache_gib: int, threads: int | None = None) -> dict[str, str]:
    """Environment for an engine process (CPU KV-cache size, optional thread count)."""
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def error_tail(log: Path, lines: int = 12) -> str:
    """Last lines of a log that look like the error (for a failed engine)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    hits = [ln for ln in text if "Error" in ln or "error" in ln or "Exception" in ln]
    return "\n".join((hits or text)[-lines:])


# ------------------------------------------------------------------ child side

def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def level_prompts(items: list[Any], level: int, per_level: int | None) -> list[Any]:
    """The prompts one batch size / concurrency level runs: all of them, or with
    ``--requests-per-level N`` the first max(N, level) (a full batch at every level)."""
    return items if not per_level else items[:max(per_level, level)]


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Start the engine, warm it up, then time greedy generation at each batch size."""
    from vllm import LLM, SamplingParams

    from .specmetrics import from_vllm_metrics

    conversations = [p["messages"] for p in job["prompts"]]
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], speculative_config=job["speculative_config"],
              enforce_eager=job["enforce_eager"], max_model_len=job["max_model_len"],
              seed=job["seed"], disable_log_stats=False,
              max_num_seqs=max(max(job["batch_sizes"]), 16), **job.get("engine_args", {}))
    start_s = time.perf_counter() - t0

    # Warm up on unrelated prompts: a method with a cross-request cache (suffix) must not
    # have seen the measured prompts' outputs.
    warm = SamplingParams(temperature=0.0, max_tokens=min(16, job["max_tokens"]))
    llm.chat(WARMUP_CONVERSATIONS[:max(job["batch_sizes"])], warm, use_tqdm=False)

    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    phases: list[dict[str, Any]] = []
    for bs in job["batch_sizes"]:
        before = from_vllm_metrics(llm.get_metrics())
        elapsed, token_ids = 0.0, []
        for chunk in _chunks(level_prompts(conversations, bs, job.get("requests_per_level")), bs):
            t = time.perf_counter()
            outs = llm.chat(chunk, params, use_tqdm=False)
            elapsed += time.perf_counter() - t
            token_ids += [list(o.outputs[0].token_ids) for o in outs]
        spec = from_vllm_metrics(llm.get_metrics()) - before
        n_out = sum(len(t) for t in token_ids)
        phases.append({"batch_size": bs, "elapsed_s": elapsed, "output_tokens": n_out,
                       "tokens_per_s": n_out / elapsed if elapsed > 0 else 0.0,
                       "requests": len(token_ids), "spec": spec.to_json(),
                       "token_ids": token_ids})
    return {"status": "ok", "engine_start_s": start_s, "phases": phases}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m benchmarks.offline JOB.json OUT.json``."""
    job_path, out_path = (argv or sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text())
    try:
        result = run_job(job)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, not raised
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    tmp = Path(out_path).with_suffix(".partial")
    tmp.write_text(json.dumps(result))
    tmp.replace(out_path)
    sys.stdout.flush()
    # vLLM leaves worker processes and threads behind; exit without waiting for them.
    os._exit(0 if result["status"] == "ok" else 1)


# ------------------------------------------------------------------ parent side

def run_method(job: dict[str, Any], workdir: Path, tag: str, timeout_s: float,
               kv_cache_gib: int, threads: int | None = None) -> dict[str, Any]:
    """Run one method's engine in a child process; always returns a result dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, out_path, log_path = (workdir / f"{tag}.job.json", workdir / f"{tag}.result.json",
                                    workdir / f"{tag}.log")
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.offline", str(job_path),
                                 str(out_path)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(engine_env(kv_cache_gib, threads), **job.get("env", {}),
                                         SPECSTREAM_POLICY_DUMP=str(workdir / f"{tag}.policy.json")),
                                cwd=str(REPO_ROOT),
                                start_new_session=True)
        with PeakRSS(proc.pid) as rss:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
    wall = time.perf_counter() - t0
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    elif proc.returncode is None or proc.returncode < 0:
        result = {"status": "failed", "error": f"engine process timed out after {timeout_s:.0f} s"
                  if proc.returncode is None else f"engine process killed by signal "
                  f"{-proc.returncode}\n{error_tail(log_path)}"}
    else:
        result = {"status": "failed", "error": f"engine process exited with {proc.returncode}\n"
                  f"{error_tail(log_path)}"}
    if result["status"] == "failed" and "\n" not in result.get("error", ""):
        result["error"] += "\n" + error_tail(log_path, 6)
    _kill_group(proc)  # leftovers of os._exit
    result.update(peak_rss_mib=rss.peak_mib, max_load1=round(rss.max_load, 2), wall_s=wall,
                  log=str(log_path))
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the child's own process group (it was started in a new session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


if __name__ == "__main__":
    main()
