"""Load-and-fault storm: ``python -m tests.stress.storm`` (bounded, loopback only).

A stress test, not a benchmark: ``tests/test_storm.py`` runs a short one. Each phase sends
the same plan (``tests/stress/storm_plan.py``) first to ``specstream vllm serve``
*without* speculation, then *with* the shipped specstream streams (float32), and compares:

* ``storm``: mixed greedy / streamed / stop strings / logprobs / seeded sampling / n=2 /
  client aborts at concurrency 24, plus the max_model_len edges;
* ``preempt``: long greedy and sampled answers at concurrency 24 under a KV cache that holds
  a few sequences, so the scheduler preempts and recomputes (counted from /metrics).

After each plan the server must be healthy with nothing left running. The summary line:
wrong greedy answers / greedy answers compared, and failures (errors, malformed answers,
leaked requests). Exit status 1 when either is non-zero.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp

from benchmarks.offline import engine_env
from benchmarks.online import _wait_healthy, free_port, stop_server
from benchmarks.system import machine_info
from specstream_vllm.engine_job import error_tail
from specstream_vllm.spec_counters import SpecCounters, from_prometheus_text

from tests.stress.storm_plan import (COMPLETIONS, EDGE_TEXT, GREEDY_KINDS, SERVED_NAME, Outcome, Req, check,
                         edge_plan, limits_plan, storm_plan)

_METRIC = re.compile(r"^(vllm:[a-z_]+?)(?:_total)?(?:\{[^}]*\})?\s+(\S+)$")
_SCHEDULER = ("vllm:num_preemptions", "vllm:num_requests_running", "vllm:num_requests_waiting")


@dataclass
class ServerSpec:
    model: str
    streams: Optional[str]               # None: no speculation
    gamma: int = 4
    max_model_len: int = 1024
    kv_cache_bytes: Optional[int] = None  # None: VLLM_CPU_KVCACHE_SPACE (1 GiB)
    enforce_eager: bool = False
    max_num_seqs: int = 32

    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "specstream_vllm.cli", "vllm", "serve", self.model,
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
               "--dtype", "float32", "--seed", "0", "--max-model-len", str(self.max_model_len),
               "--max-num-seqs", str(self.max_num_seqs)]
        if self.streams:
            cmd += ["--speculative-config", json.dumps(
                {"method": "specstream", "model": self.streams, "num_speculative_tokens": self.gamma})]
        if self.kv_cache_bytes:
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_bytes)]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd


def metrics(base: str) -> dict[str, float]:
    """Preemptions, running and waiting requests from /metrics (summed over labels), and the
    spec-decode counters (vLLM names, see ``specstream_vllm.spec_counters``)."""
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = from_prometheus_text(text).to_metrics()
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m and m.group(1) in _SCHEDULER:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


# ---------------------------------------------------------------- one request

async def send(client: aiohttp.ClientSession, base: str, req: Req) -> Outcome:
    out = Outcome(req.id, req.kind)
    try:
        async with client.post(base + req.path, json=req.body) as resp:
            out.status = resp.status
            if resp.status != 200:
                if req.kind not in ("edge", "refused"):
                    out.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return out
            if req.body.get("stream"):
                await _read_stream(resp, req, out)
            else:
                _read_body(await resp.json(), req, out)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def _read_body(data: dict[str, Any], req: Req, out: Outcome) -> None:
    choices = sorted(data["choices"], key=lambda c: c["index"])
    out.texts = [c["message"]["content"] if req.path != COMPLETIONS else c["text"] for c in choices]
    out.finish = [c["finish_reason"] for c in choices]
    out.completion_tokens = int(data["usage"]["completion_tokens"])
    out.logprobs = choices[0].get("logprobs") if choices else None


async def _read_stream(resp: aiohttp.ClientResponse, req: Req, out: Outcome) -> None:
    text, finish, chunks = [], None, 0
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        chunk = json.loads(line[5:])
        chunks += 1
        if req.abort_after_chunks and chunks >= req.abort_after_chunks:
            resp.close()  # hang up mid-answer: the server must abort the request
            out.aborted = True
            return
        if chunk.get("usage"):
            out.completion_tokens = int(chunk["usage"]["completion_tokens"])
        for c in chunk.get("choices") or []:
            text.append((c.get("delta") or {}).get("content") or "")
            finish = c.get("finish_reason") or finish
    out.texts, out.finish = ["".join(text)], [finish]


async def drive(base: str, plan: list[Req], concurrency: int, timeout_s: float) -> list[Outcome]:
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=conn) as client:
        async def bounded(r: Req) -> Outcome:
            async with sem:
                return await send(client, base, r)
        return list(await asyncio.gather(*(bounded(r) for r in plan)))


# ---------------------------------------------------------------- one server

def settle(base: str, timeout_s: float = 60) -> list[str]:
    """Problems left after a plan: unhealthy server, requests still running or waiting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            healthy = urllib.request.urlopen(base + "/health", timeout=10).status == 200
            m = metrics(base)
        except OSError as exc:
            return [f"server unreachable after the plan: {exc}"]
        left = m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
        if healthy and left == 0:
            return []
        if time.monotonic() > deadline:
            return [f"after the plan: healthy={healthy}, {left:.0f} requests still running/waiting"]
        time.sleep(2)


def serve_and_run(spec: ServerSpec, plans: dict[str, tuple[list[Req], int]], workdir: Path,
                  tag: str, startup_timeout_s: float, request_timeout_s: float) -> dict[str, Any]:
    """Start one server, run each named plan (requests, concurrency), stop it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, **engine_env(1))
    if spec.kv_cache_bytes:
        env.pop("VLLM_CPU_KVCACHE_SPACE")  # it would override --kv-cache-memory-bytes
    log = workdir / f"{tag}.log"
    t0 = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(spec.command(port), stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            err = _wait_healthy(proc, base, startup_timeout_s)
            if err:
                raise RuntimeError(f"{tag}: {err}\n{error_tail(log)}")
            result: dict[str, Any] = {"start_s": round(time.monotonic() - t0), "phases": {}}
            for name, (plan, conc) in plans.items():
                before, t1 = metrics(base), time.monotonic()
                outcomes = asyncio.run(drive(base, plan, conc, request_timeout_s))
                problems = settle(base)
                after = metrics(base)
                spec_delta = SpecCounters.from_metrics(after) - SpecCounters.from_metrics(before)
                delta = {"vllm:num_preemptions": after.get("vllm:num_preemptions", 0)
                         - before.get("vllm:num_preemptions", 0), **spec_delta.to_metrics()}
                result["phases"][name] = {"seconds": round(time.monotonic() - t1, 1),
                                          "outcomes": outcomes, "server_problems": problems,
                                          "counters": delta}
            return result
        finally:
            stop_server(proc)


# ---------------------------------------------------------------- comparison

def compare(plan: list[Req], base: list[Outcome], spec: list[Outcome]) -> dict[str, Any]:
    """Greedy answers equal the baseline's; every answer of either server well-formed."""
    wrong, compared, failures = [], 0, []
    for req, b, s in zip(plan, base, spec):
        failures += [f"baseline {p}" for p in check(req, b)] + [f"specstream {p}" for p in check(req, s)]
        if req.kind == "refused" and (b.status, s.status) != (200, 400):
            failures.append(f"{req.id}: HTTP {b.status} without / {s.status} with speculation, "
                            "expected 200 / 400 (vLLM refuses it with speculative decoding)")
        if req.kind in GREEDY_KINDS and not (b.error or s.error):
            compared += 1
            if b.key() != s.key():
                wrong.append({"id": req.id, "baseline": asdict(b), "specstream": asdict(s)})
    return {"requests": len(plan), "greedy_compared": compared, "wrong_greedy": wrong,
            "failures": failures, "aborted": sum(s.aborted for s in spec),
            "edge_refused": sum(1 for s in spec if s.kind == "edge" and s.status == 400),
            "edges": {s.id: [s.status, s.completion_tokens, s.finish] for s in spec if s.kind == "edge"}}


def run_pair(model: str, streams: str, plans: dict[str, tuple[list[Req], int]], workdir: Path,
             tag: str, startup_timeout_s: float = 900, request_timeout_s: float = 900,
             **server: Any) -> dict[str, Any]:
    """The plans on a server without speculation, then with specstream; compared per phase."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = serve_and_run(ServerSpec(model, None, **server), plans, workdir, f"{tag}-baseline",
                         startup_timeout_s, request_timeout_s)
    spec = serve_and_run(ServerSpec(model, streams, **server), plans, workdir, f"{tag}-specstream",
                         startup_timeout_s, request_timeout_s)
    report: dict[str, Any] = {}
    for name, (plan, conc) in plans.items():
        b, s = base["phases"][name], spec["phases"][name]
        r = compare(plan, b["outcomes"], s["outcomes"])
        r["failures"] += [f"baseline: {p}" for p in b["server_problems"]]
        r["failures"] += [f"specstream: {p}" for p in s["server_problems"]]
        r.update(concurrency=conc, seconds={"baseline": b["seconds"], "specstream": s["seconds"]},
                 counters={"baseline": b["counters"], "specstream": s["counters"]})
        report[f"{tag}/{name}"] = r
    return report


def kv_bytes_for_tokens(model: str, tokens: int) -> int:
    """Bytes of a float32 KV cache holding ``tokens`` tokens of ``model``."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return tokens * cfg["num_hidden_layers"] * 2 * cfg.get("num_key_value_heads", heads) * head_dim * 4


def edge_token_ids(model: str) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model)(EDGE_TEXT, add_special_tokens=False).input_ids


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    compared = sum(r["greedy_compared"] for r in report.values())
    wrong = sum(len(r["wrong_greedy"]) for r in report.values())
    failures = [f for r in report.values() for f in r["failures"]]
    preempt = sum(r["counters"]["specstream"].get("vllm:num_preemptions", 0) for r in report.values())
    return {"wrong_greedy": wrong, "greedy_compared": compared, "failures": len(failures),
            "requests": sum(r["requests"] for r in report.values()),
            "aborted": sum(r["aborted"] for r in report.values()),
            "specstream_preemptions": int(preempt), "failure_list": failures[:20]}


def print_report(report: dict[str, Any], summary: dict[str, Any]) -> None:
    for name, r in report.items():
        c = r["counters"]["specstream"]
        acc = SpecCounters.from_metrics(c).mean_acceptance_length
        print(f"[storm] {name}: {r['requests']} requests at concurrency {r['concurrency']}: "
              f"wrong greedy {len(r['wrong_greedy'])}/{r['greedy_compared']}, failures "
              f"{len(r['failures'])}, aborted {r['aborted']}, edge requests refused (400) "
              f"{r['edge_refused']}, preemptions {c.get('vllm:num_preemptions', 0):.0f}, "
              f"mean acceptance length {acc:.2f}, seconds {r['seconds']}")
    for f in summary["failure_list"]:
        print(f"[storm]   failure: {f}")
    print(f"[storm] SUMMARY: wrong greedy answers {summary['wrong_greedy']}/{summary['greedy_compared']}, "
          f"failures {summary['failures']}, requests {summary['requests']} "
          f"({summary['aborted']} aborted by the client), specstream preemptions "
          f"{summary['specstream_preemptions']}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.stress.storm", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--streams", help="stream checkpoint (default: the shipped one)")
    p.add_argument("--requests", type=int, default=192, help="storm requests")
    p.add_argument("--preempt-requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--tiny-kv-tokens", type=int, default=1536,
                   help="preempt phase: KV cache size in tokens (a few sequences)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/storm", help="logs and storm.json")
    a = p.parse_args(argv)
    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    model = a.model or str(default_model_dir())
    streams = a.streams or str(shipped_streams_dir())
    out = Path(a.out)
    t0 = time.monotonic()
    storm = (storm_plan(a.requests, a.seed) + edge_plan(edge_token_ids(model), a.max_model_len, 4)
             + limits_plan())
    preempt = storm_plan(a.preempt_requests, a.seed + 1, max_tokens=(160, 320), ignore_eos=True,
                         kinds=["greedy", "seeded", "greedy_stream", "n2", "abort", "greedy"])
    common = dict(max_model_len=a.max_model_len, enforce_eager=a.enforce_eager)
    report = run_pair(model, streams, {"storm": (storm, a.concurrency)}, out, "normal-kv", **common)
    report.update(run_pair(model, streams, {"preempt": (preempt, a.concurrency)}, out, "tiny-kv",
                           kv_cache_bytes=kv_bytes_for_tokens(model, a.tiny_kv_tokens), **common))
    summary = summarize(report)
    summary.update(wall_minutes=round((time.monotonic() - t0) / 60, 1),
                   command=" ".join(["python -m tests.stress.storm", *(argv if argv is not None else sys.argv[1:])]),
                   cpu=machine_info()["cpu_model"])
    (out / "storm.json").write_text(json.dumps({"summary": summary, "report": report}, indent=1,
                                               default=lambda o: asdict(o)))
    print_report(report, summary)
    print(f"[storm] {summary['wall_minutes']} min on {summary['cpu']}; details: {out / 'storm.json'}")
    return 1 if summary["wrong_greedy"] or summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
