"""Soak: a ``vllm serve`` server with specstream under mixed traffic for a long time.

Greedy answers are first recorded from a server without speculation (same model, float32);
then the specstream server takes mixed traffic from a few client threads -- greedy
(checked against the recorded answers), sampled short and long, streamed, aborted
mid-stream, and structured (JSON schema) -- for ``--minutes``. Recorded over time: the
resident memory of the server's processes, the sizes of the drafter's per-request
structures (``SPECSTREAM_STATE_LOG``, written by the engine process: suffix trees, the
policy's records and calibration tables, vLLM's per-request maps), latency percentiles,
5xx responses and wrong greedy answers. Writes ``soak.json`` and ``soak.png`` to ``--out``.

    python -m tests.stress.soak --minutes 30 --out soak_out
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from specstream_vllm.vllm_integration.state_sizes import read_log

SERVED = "soak-model"
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does, briefly.",
    "Why is the sky blue? Answer in two sentences.",
    "Repeat this sentence three times: the quick brown fox jumps over the lazy dog.",
]
STRUCTURED_PROMPTS = ["Describe a person as JSON with a name and an age.",
                      "Give me a JSON object for a cat named Tom who is 3."]
SAMPLED_PROMPTS = [
    "Tell me a short story about a robot who learns to paint.",
    "Describe your ideal weekend.",
    "Write a limerick about a cat.",
    "What are the pros and cons of working from home?",
    "Summarize the plot of a heist movie you would like to see.",
]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}}}
GREEDY_TOKENS = 40
# kind -> weight in the mix
MIX = {"greedy": 3, "sampled_short": 3, "sampled_long": 1, "stream": 2, "abort": 1,
       "structured": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, spec: dict | None, port: int, log: Path, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "specstream_vllm.cli", "vllm", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--served-model-name", SERVED, "--max-num-seqs", "16"]
    if spec:
        cmd += ["--speculative-config", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=dict(os.environ, **env))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited (log {log}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_server(proc)
    raise RuntimeError(f"server not healthy within 900 s (log {log})")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def chat(base: str, prompt: str, **kw) -> httpx.Response:
    body = {"model": SERVED, "messages": [{"role": "user", "content": prompt}], **kw}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=600)


def structured_kwargs() -> dict:
    return {"response_format": {"type": "json_schema",
                                "json_schema": {"name": "person", "schema": SCHEMA}}}


def reference_answers(base: str) -> dict:
    """The greedy answers (plain and structured) every later greedy request must repeat."""
    out = {}
    for p in GREEDY_PROMPTS + STRUCTURED_PROMPTS:
        extra = structured_kwargs() if p in STRUCTURED_PROMPTS else {}
        r = chat(base, p, temperature=0, max_tokens=GREEDY_TOKENS, **extra)
        r.raise_for_status()
        out[p] = r.json()["choices"][0]["message"]["content"]
    return out


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Traffic:
    """Client threads sending the mix until ``stop_at``; every request becomes a record."""

    def __init__(self, base: str, reference: dict, seed: int):
        self.base, self.reference = base, reference
        self.rng = random.Random(seed)
        self.records: list[dict] = []
        self.wrong: list[dict] = []
        self.lock = threading.Lock()

    def one(self, rng: random.Random) -> dict:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        t0 = time.time()
        rec = {"t": t0, "kind": kind, "status": None, "latency": None, "ttft": None}
        try:
            if kind in ("greedy", "structured"):
                structured = kind == "structured"
                p = rng.choice(STRUCTURED_PROMPTS if structured else GREEDY_PROMPTS)
                extra = structured_kwargs() if structured else {}
                r = chat(self.base, p, temperature=0, max_tokens=GREEDY_TOKENS, **extra)
                rec["status"] = r.status_code
                if r.status_code == 200:
                    text = r.json()["choices"][0]["message"]["content"]
                    want = self.reference[p]
                    if structured:
                        rec["valid_json"] = _is_json(text)
                    if text != want:
                        raise ValueError(f"wrong greedy answer to {p!r}: {text!r} != {want!r}")
            elif kind in ("sampled_short", "sampled_long"):
                r = chat(self.base, rng.choice(SAMPLED_PROMPTS), temperature=0.8, top_p=0.95,
                         max_tokens=24 if kind == "sampled_short" else 300,
                         seed=rng.randrange(1 << 30))
                rec["status"] = r.status_code
            else:   # streamed; "abort" closes the connection after a few chunks
                body = {"model": SERVED, "stream": True, "max_tokens": 120, "temperature": 0.7,
                        "messages": [{"role": "user", "content": rng.choice(SAMPLED_PROMPTS)}]}
                with httpx.stream("POST", self.base + "/v1/chat/completions", json=body,
                                  timeout=600) as r:
                    rec["status"] = r.status_code
                    chunks = 0
                    for line in r.iter_lines():
                        if line.startswith("data:") and rec["ttft"] is None:
                            rec["ttft"] = time.time() - t0
                        chunks += 1
                        if kind == "abort" and chunks >= 4:
                            break
        except ValueError as e:
            rec["wrong"] = str(e)
        except httpx.HTTPError as e:
            rec["error"] = repr(e)
        rec["latency"] = time.time() - t0
        return rec

    def run(self, threads: int, stop_at: float) -> None:
        def loop(seed: int) -> None:
            rng = random.Random(seed)
            while time.time() < stop_at:
                rec = self.one(rng)
                with self.lock:
                    self.records.append(rec)
                    if "wrong" in rec:
                        self.wrong.append(rec)
        ts = [threading.Thread(target=loop, args=(self.rng.randrange(1 << 30),), daemon=True)
              for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()


def process_rss(pid: int) -> dict:
    """Resident bytes of the server's process tree: the API server and each child."""
    import psutil
    out = {}
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                out[f"{p.pid}:{p.name()}"] = p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return out


def sample_memory(pid: int, series: list, stop: threading.Event, every_s: float) -> None:
    while not stop.is_set():
        series.append({"t": time.time(), "rss": process_rss(pid)})
        stop.wait(every_s)


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]  # noqa: E731
    return {"n": len(xs), "p50": round(pick(0.5), 3), "p90": round(pick(0.9), 3),
            "p99": round(pick(0.99), 3), "max": round(xs[-1], 3)}


def flatness(times: list[float], values: list[float], t0: float, t1: float, warmup: float) -> dict:
    """A series after warm-up: its max in the first and the last half of the rest."""
    start = t0 + warmup * (t1 - t0)
    mid = (start + t1) / 2
    a = [v for t, v in zip(times, values) if start <= t < mid]
    b = [v for t, v in zip(times, values) if t >= mid]
    return {"max_after_warmup_first_half": max(a) if a else None,
            "max_last_half": max(b) if b else None, "max": max(values) if values else None,
            "last": values[-1] if values else None}


def summarize(traffic: Traffic, memory: list, states: list, t0: float, t1: float,
              idle: dict | None, minutes: float) -> dict:
    recs = traffic.records
    by_kind = {}
    for kind in MIX:
        rs = [r for r in recs if r["kind"] == kind]
        by_kind[kind] = {"requests": len(rs), "latency_s": percentiles([r["latency"] for r in rs
                                                                         if r.get("status") == 200]),
                         "ttft_s": percentiles([r["ttft"] for r in rs if r["ttft"] is not None])}
    mem_t = [m["t"] for m in memory]
    mem_total = [sum(m["rss"].values()) / 2**20 for m in memory]
    keys = sorted({k for s in states for k in s["sizes"]})
    structures = {k: flatness([s["t"] for s in states], [s["sizes"].get(k, 0) for s in states],
                              t0, t1, 0.2) for k in keys}
    return {
        "minutes_requested": minutes, "minutes_run": round((t1 - t0) / 60, 2),
        "requests": len(recs), "by_kind": by_kind,
        "status_5xx": sum(1 for r in recs if (r.get("status") or 0) >= 500),
        "client_errors": [r for r in recs if "error" in r][:20],
        "errors": sum(1 for r in recs if "error" in r),
        "wrong_greedy": len(traffic.wrong), "wrong_examples": traffic.wrong[:5],
        "greedy_checked": sum(1 for r in recs if r["kind"] in ("greedy", "structured")
                              and r.get("status") == 200),
        "structured_invalid_json": sum(1 for r in recs if r.get("valid_json") is False),
        "rss_mb": flatness(mem_t, mem_total, t0, t1, 0.2),
        "engine_rss_mb": flatness([s["t"] for s in states], [s["rss"] / 2**20 for s in states],
                                  t0, t1, 0.2),
        "structures": structures, "idle_after_load": idle,
    }


def plot(out: Path, memory: list, states: list, traffic: Traffic, t0: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    ax[0].plot([(m["t"] - t0) / 60 for m in memory], [sum(m["rss"].values()) / 2**20 for m in memory],
               label="server processes (total)")
    ax[0].plot([(s["t"] - t0) / 60 for s in states], [s["rss"] / 2**20 for s in states],
               label="engine process")
    ax[0].set_ylabel("resident memory (MiB)")
    ax[0].legend()
    keys = sorted({k for s in states for k in s["sizes"]})
    varying = [k for k in keys if len({s["sizes"].get(k, 0) for s in states}) > 1]
    for k in varying:
        ax[1].plot([(s["t"] - t0) / 60 for s in states], [s["sizes"].get(k, 0) for s in states],
                   label=k)
    ax[1].set_ylabel("entries")
    ax[1].set_yscale("symlog")
    ax[1].legend(fontsize=6, ncol=2)
    ok = [r for r in traffic.records if r.get("status") == 200]
    for kind in MIX:
        xs = [(r["t"] - t0) / 60 for r in ok if r["kind"] == kind]
        ys = [r["latency"] for r in ok if r["kind"] == kind]
        ax[2].scatter(xs, ys, s=4, label=kind)
    ax[2].set_ylabel("latency (s)")
    ax[2].set_xlabel("minutes")
    ax[2].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path("soak_out"))
    ap.add_argument("--threads", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", help="served model (default: the embedded SmolLM2)")
    ap.add_argument("--streams", help="stream checkpoint (default: the shipped one)")
    args = ap.parse_args()
    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    model = args.model or str(default_model_dir())
    streams = args.streams or str(shipped_streams_dir())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}

    port = free_port()
    proc = start_server(model, None, port, out / "baseline_server.log", env)
    try:
        reference = reference_answers(f"http://127.0.0.1:{port}")
    finally:
        stop_server(proc)
    (out / "reference.json").write_text(json.dumps(reference, indent=1))

    state_log = out / "state.jsonl"
    state_log.unlink(missing_ok=True)
    port = free_port()
    spec = {"method": "specstream", "model": streams, "num_speculative_tokens": 4}
    proc = start_server(model, spec, port, out / "server.log",
                        dict(env, SPECSTREAM_STATE_LOG=str(state_log)))
    base = f"http://127.0.0.1:{port}"
    memory: list = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, memory, stop, 10.0), daemon=True)
    traffic = Traffic(base, reference, args.seed)
    idle = None
    try:
        sampler.start()
        t0 = time.time()
        traffic.run(args.threads, t0 + args.minutes * 60)
        t1 = time.time()
        # after the load, one lone request: the structures it logs are the idle ones
        chat(base, GREEDY_PROMPTS[0], temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
        states = read_log(state_log) if state_log.exists() else []
        idle = states[-1]["sizes"] if states else None
        stop.set()
        sampler.join()
    finally:
        stop_server(proc)
    result = summarize(traffic, memory, states, t0, t1, idle, args.minutes)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in traffic.records))
    plot(out, memory, states, traffic, t0)
    print(json.dumps({k: result[k] for k in ("minutes_run", "requests", "status_5xx", "errors",
                                             "wrong_greedy", "rss_mb")}, indent=1))


if __name__ == "__main__":
    main()
