"""Run one real vLLM engine in a child process: the package's one way to do so.

Every engine that is measured or compared (the main job, the API benchmark's baseline, the
benchmark harness, the engine tests) runs in its own interpreter: vLLM on CPU spawns workers
and keeps threads, and a process that ends returns all its memory. The parent writes a job
JSON, starts ``python -m specstream_vllm.engine_job JOB.json OUT.json`` in a new process group,
and reads ``OUT.json``; a failed or crashed engine gives ``status: "failed"`` with the error and
the log's tail.

What the child does with its engine (keys of the job):

* default: ``prompts`` (strings, chat messages or token ids) generated in ``batches`` (lists of
  prompt indices), each batch timed, with its outputs and the spec-decode counters after it
  (``metrics``, vLLM names); ``warmup`` prompts run first, untimed;
* ``serve: true``: after the warm-up, one request per line on stdin (``{"n": N, "prompts":
  [...]}``), each answered in ``OUT.N.json`` (an engine that stays up while others take turns);
* ``call: "module:function"``: the function gets the job and returns the result (it builds the
  engine itself, e.g. the API benchmark's baseline, which times what the speculative side times).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

# ------------------------------------------------------------------ child


def build_llm(job: dict):
    """The ``vllm.LLM`` a job describes (``llm_kwargs`` verbatim, else the job's fields)."""
    from vllm import LLM

    if "llm_kwargs" in job:
        return LLM(**job["llm_kwargs"])
    kwargs = dict(model=job["model"], dtype=job.get("dtype", "float32"),
                  enforce_eager=job.get("enforce_eager", True),
                  max_model_len=job.get("max_model_len", 1024), seed=job.get("seed", 0),
                  disable_log_stats=False, speculative_config=job.get("spec"),
                  tensor_parallel_size=job.get("tp", 1),
                  skip_tokenizer_init=job.get("skip_tokenizer_init", False),
                  max_num_seqs=job.get("max_num_seqs", 16))
    return LLM(**{**kwargs, **job.get("engine_args", {})})   # engine_args win (e.g. dtype)


def _token_prompts(llm, prompts: list, skip_tokenizer: bool) -> list:
    """Strings (one user turn) and message lists through the chat template; ids as they are."""
    from vllm.inputs import TokensPrompt

    tok = None if skip_tokenizer else llm.get_tokenizer()
    out = []
    for p in prompts:
        if isinstance(p, list) and p and isinstance(p[0], int):
            ids = p
        else:
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False).input_ids
        out.append(TokensPrompt(prompt_token_ids=list(ids)))
    return out


def _params(job: dict, n: int) -> list:
    """Per-prompt sampling: one temperature for all or one each (mixed greedy/sampled
    batches); sampled requests are seeded by their index, so runs are reproducible."""
    from vllm import SamplingParams

    max_tokens = job.get("max_tokens", 32)
    max_tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
    temps = job.get("temperatures") or [job.get("temperature", 0.0)] * n
    return [SamplingParams(temperature=t, max_tokens=m, seed=(1234 + i) if t else None,
                           ignore_eos=job.get("ignore_eos", False))
            for i, (m, t) in enumerate(zip(max_tokens, temps))]


def _generate(llm, prompts: list, params: list) -> dict:
    from .spec_counters import read

    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"seconds": time.perf_counter() - t,
            "outputs": [list(o.outputs[0].token_ids) for o in outs],
            "finish_reasons": [o.outputs[0].finish_reason or "" for o in outs],
            "metrics": read(llm).to_metrics()}  # cumulative after this call


def _warm_up(llm, job: dict) -> None:
    """``warmup`` prompts as one batch, then the last ``warmup_single`` of them one at a time
    (batch-1 shapes compiled, a draft policy's step costs measured at batch 1)."""
    from vllm import SamplingParams

    if not job.get("warmup"):
        return
    prompts = _token_prompts(llm, job["warmup"], job.get("skip_tokenizer_init", False))
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=job.get("warmup_max_tokens", 16)),
                 use_tqdm=False)
    for p in prompts[len(prompts) - job.get("warmup_single", 0):]:
        llm.generate([p], SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)


def run(job: dict, out_path: Optional[Path] = None) -> dict:
    """The child's work (see the module docstring); returns the result."""
    from .spec_counters import read

    if job.get("call"):
        module, _, name = job["call"].partition(":")
        return {"status": "ok", **getattr(importlib.import_module(module), name)(job)}
    t0 = time.perf_counter()
    llm = build_llm(job)
    result: dict = {"status": "ok", "engine_start_s": time.perf_counter() - t0, "batches": []}
    _warm_up(llm, job)
    result["start_metrics"] = read(llm).to_metrics()
    skip = job.get("skip_tokenizer_init", False)
    if job.get("serve"):
        _serve(llm, job, Path(out_path), skip)
        return result
    prompts = _token_prompts(llm, job["prompts"], skip)
    params = _params(job, len(prompts))
    for batch in job.get("batches", [list(range(len(prompts)))]):
        rec = _generate(llm, [prompts[i] for i in batch], [params[i] for i in batch])
        result["batches"].append({"indices": batch, **rec})
    result["metrics"] = read(llm).to_metrics()
    return result


def _serve(llm, job: dict, out_path: Path, skip: bool) -> None:
    from .spec_counters import read

    _write(out_path.with_suffix(".ready"), {"status": "ready", "metrics": read(llm).to_metrics()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        prompts = _token_prompts(llm, cmd["prompts"], skip)
        _write(out_path.with_suffix(f".{cmd['n']}.json"),
               _generate(llm, prompts, _params(job, len(prompts))))


def _write(path: Path, obj: dict) -> None:
    tmp = path.with_name("." + path.name + ".partial")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def main(argv: Optional[list[str]] = None) -> None:
    """Child entry point: ``python -m specstream_vllm.engine_job JOB.json OUT.json``."""
    import traceback

    job_path, out_path = (argv or sys.argv[1:])[:2]
    job = json.loads(Path(job_path).read_text())
    os.environ.update(job.get("env", {}))
    try:
        result = run(job, Path(out_path))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, not raised
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    _write(Path(out_path), result)
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM leaves worker processes and threads behind; exit without waiting for them
    os._exit(0 if result["status"] == "ok" else 1)


# ------------------------------------------------------------------ parent


def error_tail(log: Path, lines: int = 12) -> str:
    """Last lines of a log that look like the error (all last lines when none does)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    hits = [ln for ln in text if "Error" in ln or "error" in ln or "Exception" in ln]
    return "\n".join((hits or text)[-lines:])


class EngineProcess:
    """One engine job in a child process (its own process group), with its files in ``workdir``:
    ``NAME.job.json``, ``NAME.out.json``, ``NAME.log``."""

    def __init__(self, job: dict, workdir: Path | str, name: str, env: Optional[dict] = None):
        self.workdir, self.name = Path(workdir), name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.job_path = self.workdir / f"{name}.job.json"
        self.out_path = self.workdir / f"{name}.out.json"
        self.log_path = self.workdir / f"{name}.log"
        for stale in self.workdir.glob(f"{name}.out*"):
            stale.unlink()
        self.job_path.write_text(json.dumps(job))
        full_env = dict(os.environ, **(env or {}), **job.get("env", {}))
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specstream_vllm.engine_job", str(self.job_path), str(self.out_path)],
            stdin=subprocess.PIPE if job.get("serve") else subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, env=full_env, start_new_session=True, text=True)
        self.t0 = time.perf_counter()
        self._n = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> dict:
        """The job's result; ``status: "failed"`` with the reason when it did not finish."""
        timed_out = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        self.kill()
        if self.out_path.is_file():
            result = json.loads(self.out_path.read_text())
            if result["status"] != "ok":
                result["error"] += "\n" + error_tail(self.log_path, 6)
        elif timed_out:
            result = {"status": "failed", "error": f"engine process timed out after {timeout:.0f} s"}
        else:
            result = {"status": "failed", "error": f"engine process exited with "
                      f"{self.proc.returncode}\n{error_tail(self.log_path)}"}
        result.update(wall_s=time.perf_counter() - self.t0, log=str(self.log_path))
        return result

    def _await_file(self, path: Path, timeout: float, what: str) -> dict:
        t = time.time()
        while not path.exists():
            if self.proc.poll() is not None or time.time() - t > timeout:
                raise RuntimeError(f"{self.name}: engine {what} failed (exit {self.proc.poll()}), "
                                   f"see {self.log_path}:\n{error_tail(self.log_path)}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def wait_ready(self, timeout: float) -> dict:
        """``serve`` jobs: block until the engine is up and warmed up; its counters then."""
        return self._await_file(self.out_path.with_suffix(".ready"), timeout, "start")["metrics"]

    def request(self, prompts: list, timeout: float) -> dict:
        """``serve`` jobs: generate ``prompts`` as one call; seconds, outputs, counters after."""
        self._n += 1
        self.proc.stdin.write(json.dumps({"n": self._n, "prompts": prompts}) + "\n")
        self.proc.stdin.flush()
        return self._await_file(self.out_path.with_suffix(f".{self._n}.json"), timeout, "request")

    def stop(self, grace_s: float = 60) -> None:
        """``serve`` jobs: ask the engine to stop, then clear its process group."""
        if self.proc.stdin and self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=grace_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        """Terminate the child's process group (leftover workers included)."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        if not self._log.closed:
            self._log.close()


def run_in_subprocess(job: dict, workdir, name: str, timeout: float = 1800,
                      env: Optional[dict] = None) -> dict:
    """Run ``job`` in a child process; raise with the engine's log tail when it fails."""
    result = EngineProcess(job, workdir, name, env).wait(timeout)
    if result["status"] != "ok":
        raise RuntimeError(f"engine job {name} failed (log: {result['log']}):\n{result['error'][-5000:]}")
    return result


if __name__ == "__main__":
    main()
