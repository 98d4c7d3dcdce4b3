"""Offline benchmark (``vllm.LLM``): every method's engine stays up and the methods take turns.

On a shared CPU the load of other jobs changes minute to minute; methods timed one after the
other would differ by the load they met. Here each round runs every method back to back on
the same fresh prompts (the order rotated per round), the ratio to no speculation is taken
within the round, and the report gives the median over rounds. No engine sees a prompt twice
unless the workload runs out (then flagged), so suffix caches cannot replay answers.

Each engine is a ``serve`` job of :mod:`specstream_vllm.engine_job`, started one at a time
(concurrent compilation on a few busy cores times out), its process tree's RSS sampled.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from specstream_vllm.engine_job import EngineProcess
from specstream_vllm.spec_counters import SpecCounters

from .methods import Method
from .system import PeakRSS

WARMUP_CONVERSATIONS = [
    [{"role": "user", "content": f"Count from {i} to {i + 30}, one number per line."}]
    for i in range(1, 65)]


def engine_env(kv_cache_gib: int, threads: int | None = None) -> dict[str, str]:
    """Environment of an engine process: CPU KV-cache size, optional thread count."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def rotated(items: list[Any], r: int) -> list[Any]:
    """The list rotated left by ``r`` (round r starts with a different method)."""
    if not items:
        return []
    r %= len(items)
    return items[r:] + items[:r]


def level_sizes(batch_sizes: list[int], per_level: int, rounds: int,
                rounds_at: dict[int, int]) -> list[tuple[int, int, int]]:
    """(batch size, rounds, prompts per round) of each level: max(per_level, batch) prompts."""
    return [(b, rounds_at.get(b, rounds), max(per_level, b)) for b in batch_sizes]


class _Engine:
    def __init__(self, method: Method, args: Any, folder: Path):
        self.name = method.name
        max_seqs = max(max(args.batch_sizes), 16)
        job = {"model": args.model, "dtype": args.dtype, "spec": method.speculative_config,
               "engine_args": method.engine_args, "max_model_len": args.max_model_len,
               "max_tokens": args.max_tokens, "max_num_seqs": max_seqs,
               "enforce_eager": args.enforce_eager, "seed": args.seed, "serve": True,
               "warmup": WARMUP_CONVERSATIONS[:max_seqs], "warmup_single": args.warmup_single,
               "env": {**engine_env(args.kv_cache_gib, args.threads), **method.env,
                       "SPECSTREAM_POLICY_DUMP": str(folder / f"{method.name}.policy.json")}}
        self.policy_path = folder / f"{method.name}.policy.json"
        self.proc = EngineProcess(job, folder, method.name)
        self.rss = PeakRSS(self.proc.pid).__enter__()
        t0 = time.perf_counter()
        self.counters = SpecCounters.from_metrics(self.proc.wait_ready(args.timeout))
        self.start_s = time.perf_counter() - t0

    def run(self, prompts: list, timeout: float) -> tuple[float, list[list[int]], SpecCounters]:
        res = self.proc.request(prompts, timeout)
        after = SpecCounters.from_metrics(res["metrics"])
        spec, self.counters = after - self.counters, after
        return res["seconds"], res["outputs"], spec

    def stop(self) -> None:
        self.rss.__exit__()
        self.proc.stop()


def replay_warning(workload: str, prompts: int, sizes: list[tuple[int, int, int]]) -> str | None:
    """A line saying where a run asks for more of ``workload``'s prompts than it has, before
    the engines start (the report flags the rounds afterwards): from there on engines see
    prompts again, and suffix caches (``suffix``, specstream's match source) replay answers."""
    needed = sum(rounds * n for _, rounds, n in sizes)
    if needed <= prompts:
        return None
    cursor = 0
    for b, rounds, n in sizes:
        for r in range(rounds):
            if cursor + n > prompts:
                return (f"[bench] WARNING: workload {workload} has {prompts} prompts and this run "
                        f"asks for {needed}; from batch {b} round {r} on, engines see prompts "
                        "again and suffix caches replay their answers (lower --per-level or "
                        "--rounds)")
            cursor += n
    return None


def run_offline(methods: list[Method], workloads: dict[str, list[list[dict]]], args: Any,
                folder: Path, save: Callable[[dict], None]) -> dict[str, Any]:
    """All engines up, then per workload and batch size ``rounds`` rounds of every method on
    the same prompts. Returns ``levels`` (per round and method: seconds, tokens, tok/s,
    counters, token ids), the engines' start time and peak RSS, the load average seen."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"levels": [], "engines": {}}
    engines: list[_Engine] = []
    load: list[float] = []
    sizes = level_sizes(args.batch_sizes, args.per_level, args.rounds, args.rounds_at)
    for workload, convs in workloads.items():
        warning = replay_warning(workload, len(convs), sizes)
        if warning:
            print(warning, flush=True)
    try:
        for m in methods:
            engines.append(_Engine(m, args, folder))
            print(f"[bench] {m.name}: ready ({engines[-1].start_s:.0f} s)", flush=True)
        for workload, convs in workloads.items():
            cursor = 0
            for b, rounds, n in sizes:
                level: dict[str, Any] = {"workload": workload, "batch_size": b, "rounds": [],
                                         "repeated": []}
                for r in range(rounds):
                    chunk = [convs[(cursor + i) % len(convs)] for i in range(n)]
                    # prompts an engine has answered before: suffix caches remember the answers
                    level["repeated"].append(sum(cursor + i >= len(convs) for i in range(n)))
                    cursor += n
                    rnd: dict[str, Any] = {}
                    for e in rotated(engines, r):
                        load.append(os.getloadavg()[0])
                        secs, ids, spec = 0.0, [], SpecCounters()
                        for i in range(0, n, b):
                            s, o, c = e.run(chunk[i:i + b], args.timeout)
                            secs, ids, spec = secs + s, ids + o, spec + c
                        toks = sum(len(x) for x in ids)
                        rnd[e.name] = {"seconds": secs, "tokens": toks, "tok_s": toks / secs,
                                       "spec": spec.to_json(), "token_ids": ids}
                    level["rounds"].append(rnd)
                    base = rnd.get("baseline")
                    print(f"[bench] {workload} batch {b} round {r}: " + " ".join(
                        f"{k}={v['tok_s']:.1f}" + (f"({v['tok_s'] / base['tok_s']:.2f}x)" if base else "")
                        for k, v in rnd.items()) + f" load {os.getloadavg()[0]:.1f}", flush=True)
                out["levels"].append(level)
                save(out)
    finally:
        for e in engines:
            e.stop()
    for e in engines:
        out["engines"][e.name] = {"engine_start_s": e.start_s, "peak_rss_mib": e.rss.peak_mib}
        if e.policy_path.exists():
            import json
            out.setdefault("policy", {})[e.name] = json.loads(e.policy_path.read_text())
    out["load1_mean"] = statistics.mean(load) if load else None
    out["load1_max"] = max(load) if load else None
    return out
