"""Benchmark harness entry point: ``python -m benchmarks.run [options]``.

Runs every selected method on the same prompts, each engine in its own process (one at a time),
in an order rotated per repeat, and writes ``results.json``, ``report.md`` and PNG plots.
Example (quick check)::

    python -m benchmarks.run --methods baseline,ngram,suffix --num-prompts 16 --batch-sizes 1,4
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from . import offline, online
from .methods import ALL_METHODS, Method, build_methods, default_streams
from .report import aggregate, plot, render_markdown
from .system import machine_info
from .workloads import Prompt, load_workload, prompts_digest


DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list from {','.join(ALL_METHODS)} (default: all)")
    p.add_argument("--streams", help="specstream checkpoint dir (STREAMS_DIR; default with "
                   "the default model: the shipped streams)")
    p.add_argument("--specstream-k", type=int, default=4, help="specstream num_speculative_tokens")
    p.add_argument("--medusa", help="Medusa heads dir for vLLM's built-in medusa method")
    p.add_argument("--medusa-k", type=int, help="medusa num_speculative_tokens (default: heads)")
    p.add_argument("--suffix-k", type=int, default=8, help="suffix num_speculative_tokens")
    p.add_argument("--mode", choices=("offline", "online", "both"), default="offline")
    p.add_argument("--workload", choices=("mtbench", "sharegpt", "mixed"), default="mtbench",
                   help="mixed: MT-Bench first turns and held-out ShareGPT, alternating")
    p.add_argument("--prompts", help="JSONL file with `prompt` or `messages` per line")
    p.add_argument("--num-prompts", type=int, help="use the first N prompts")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 16], help="offline, e.g. 1,4,16")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 16], help="online, e.g. 1,4,16")
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--requests-per-level", type=int,
                   help="each batch size / concurrency runs the first max(N, level) prompts "
                        "(default: all prompts at every level)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto",
                   help="auto, bfloat16 or float32 (exact-equality check); auto = bfloat16 on CPUs "
                        "with AMX bf16, else float32 (compiled bf16 is wrong on others, e.g. AMD EPYC)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (fast start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-engine", action="store_true",
                   help="offline: one engine per method for all batch sizes (faster); suffix, "
                        "which caches earlier responses, still gets a fresh engine per size")
    p.add_argument("--repeats", type=int, default=1, help="engine runs per method (order rotated)")
    p.add_argument("--online-repeats", type=int, default=None,
                   help="online server runs per method (default: --repeats)")
    p.add_argument("--kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE per engine")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for engines (default: vLLM's)")
    p.add_argument("--engine-timeout", type=float, default=3600, help="offline s per engine")
    p.add_argument("--startup-timeout", type=float, default=600, help="online s to /health")
    p.add_argument("--request-timeout", type=float, default=600, help="online s per request")
    p.add_argument("--out", help="results folder (default benchmarks/results/<timestamp>)")
    return p.parse_args(argv)


def fit_prompts(prompts: list[Prompt], model: str, budget: int) -> tuple[list[Prompt], int]:
    """Drop prompts whose chat-templated length exceeds ``budget`` tokens; return kept, dropped."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    def length(p: Prompt) -> int:
        # tokenize=True returns a BatchEncoding (a 2-key dict) in transformers 5: count the text
        text = tok.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False).input_ids)
    kept = [p for p in prompts if length(p) <= budget]
    return kept, len(prompts) - len(kept)


def rotated(items: list[Any], r: int) -> list[Any]:
    """The list rotated left by ``r`` (repeat r starts with a different method)."""
    if not items:
        return []
    r %= len(items)
    return items[r:] + items[:r]


def run_mode(mode: str, methods: list[Method], base_job: dict[str, Any], args: argparse.Namespace,
             folder: Path, save: Callable[[], None], runs: list[dict[str, Any]]) -> None:
    """Run every runnable method ``args.repeats`` times (online: ``--online-repeats`` if
    given) in rotated order, appending to ``runs``."""
    runnable = [m for m in methods if not m.skip_reason]
    repeats = args.online_repeats if mode == "online" and args.online_repeats else args.repeats
    # online, a method that keeps state across requests gets a server per level; then every
    # method does, or the others would meet each level on a server warmed by the levels before
    fresh_levels = any(m.keeps_request_state for m in runnable)
    for r in range(repeats):
        for m in rotated(runnable, r):
            job = {**base_job, "speculative_config": m.speculative_config,
                   "engine_args": m.engine_args, "env": m.env}
            tag = f"{mode}-{m.name}-r{r}"
            print(f"[bench] {tag}: starting engine", flush=True)
            if mode == "offline":
                res = run_offline(job, folder / "logs", tag, args, m.keeps_request_state)
            else:
                res = run_online(job, folder / "logs", tag, args, fresh_levels)
            runs.append({"method": m.name, "repeat": r, **res})
            print(f"[bench] {tag}: {_one_line(res, mode)}", flush=True)
            save()


def run_offline(job: dict[str, Any], logs: Path, tag: str, args: argparse.Namespace,
                keeps_request_state: bool) -> dict[str, Any]:
    """One engine for all batch sizes (--shared-engine, except for methods that keep state
    across requests), else a fresh engine per batch size, merged into one record."""
    run = lambda j, t: offline.run_method(j, logs, t, args.engine_timeout,  # noqa: E731
                                          args.kv_cache_gib, args.threads)
    if (args.shared_engine and not keeps_request_state) or len(job["batch_sizes"]) == 1:
        return run(job, tag)
    return _merge([run({**job, "batch_sizes": [bs]}, f"{tag}-b{bs}") for bs in job["batch_sizes"]],
                  "phases")


def run_online(job: dict[str, Any], logs: Path, tag: str, args: argparse.Namespace,
               fresh_levels: bool) -> dict[str, Any]:
    """One server for all concurrency levels, or one per level when a method of the run keeps
    state across requests (it would otherwise see each prompt's answer again; the other
    methods then get one per level too, so that no server is warmer than another)."""
    run = lambda j, t: online.run_method(j, logs, t, args.startup_timeout,  # noqa: E731
                                         args.request_timeout, args.kv_cache_gib, args.threads)
    if not fresh_levels or len(job["concurrencies"]) == 1:
        return run(job, tag)
    return _merge([run({**job, "concurrencies": [c]}, f"{tag}-c{c}") for c in job["concurrencies"]],
                  "levels")


def _merge(parts: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per-level records of one method as one record (peak RSS and start time: the worst)."""
    for part in parts:
        if part["status"] != "ok":
            return part
    return {"status": "ok", key: [p for part in parts for p in part[key]],
            "engine_start_s": max(p["engine_start_s"] for p in parts),
            "peak_rss_mib": max(p["peak_rss_mib"] for p in parts),
            "max_load1": max(p.get("max_load1", 0.0) for p in parts),
            "wall_s": sum(p["wall_s"] for p in parts), "log": [p["log"] for p in parts]}


def _one_line(res: dict[str, Any], mode: str) -> str:
    if res["status"] != "ok":
        return "FAILED " + res.get("error", "").strip().splitlines()[0][:300]
    pts = res["phases" if mode == "offline" else "levels"]
    key = "batch_size" if mode == "offline" else "concurrency"
    figs = ", ".join(f"{p[key]}: {p['tokens_per_s']:.1f} tok/s" for p in pts)
    return f"ok (start {res['engine_start_s']:.0f} s; {figs}; peak RSS {res['peak_rss_mib']:.0f} MiB)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.streams = default_streams(args.model, args.streams)
    if args.model is None:
        from specstream_vllm.default_model import default_model_dir

        args.model = str(default_model_dir())
    from specstream_vllm.dtype_choice import resolve_dtype

    args.dtype = resolve_dtype(args.dtype)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(args.out or DEFAULT_RESULTS / stamp)
    folder.mkdir(parents=True, exist_ok=True)

    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    methods = build_methods(names, medusa=args.medusa, streams=args.streams,
                            specstream_k=args.specstream_k, medusa_k=args.medusa_k,
                            suffix_k=args.suffix_k)
    for m in methods:
        if m.skip_reason:
            print(f"[bench] {m.name}: skipped: {m.skip_reason}", flush=True)

    prompts = load_workload(args.workload, args.prompts, None)
    lookahead = max([args.suffix_k, args.specstream_k, args.medusa_k or 0, 4]) + 1
    prompts, dropped = fit_prompts(prompts, args.model,
                                   args.max_model_len - args.max_tokens - lookahead)
    if args.num_prompts:
        prompts = prompts[:args.num_prompts]
    if not prompts:
        print("[bench] no prompts fit the context", file=sys.stderr)
        return 2
    workload = f"prompts file {args.prompts}" if args.prompts else args.workload

    results: dict[str, Any] = {
        "meta": {"timestamp": stamp, "command": shlex.join([sys.executable, "-m", "benchmarks.run",
                                                            *(argv if argv is not None else sys.argv[1:])]),
                 "args": vars(args), "model": args.model, "dtype": args.dtype,
                 "max_tokens": args.max_tokens, "max_model_len": args.max_model_len,
                 "enforce_eager": args.enforce_eager, "repeats": args.repeats,
                 "online_repeats": args.online_repeats or args.repeats,
                 "shared_engine": args.shared_engine,
                 "workload": workload, "num_prompts": len(prompts),
                 "prompts_dropped_too_long": dropped, "prompts_digest": prompts_digest(prompts),
                 "prompt_ids": [p.id for p in prompts], "machine": machine_info()},
        "methods": [m.to_json() for m in methods],
    }
    raw = folder / "results.json"

    def save() -> None:
        tmp = raw.with_suffix(".partial")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(raw)

    base_job = {"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
                "max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager,
                "seed": args.seed, "prompts": [p.to_json() for p in prompts],
                "batch_sizes": args.batch_sizes, "concurrencies": args.concurrency,
                "requests_per_level": args.requests_per_level}
    modes = ["offline", "online"] if args.mode == "both" else [args.mode]
    for mode in modes:
        results[mode] = {"runs": []}
        run_mode(mode, methods, base_job, args, folder, save, results[mode]["runs"])
        results[mode]["aggregate"] = aggregate(results[mode]["runs"], mode)
        save()
    (folder / "report.md").write_text(render_markdown(results))
    plots = plot(results, folder)
    print(f"[bench] wrote {raw}, {folder / 'report.md'}, {', '.join(str(p) for p in plots)}")
    print((folder / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
