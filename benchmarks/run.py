"""Benchmark harness entry point: ``python -m benchmarks.run [options]``.

Offline (``vllm.LLM``, :mod:`benchmarks.offline`): all methods' engines up at once, taking
turns on the same fresh prompts round after round, per workload and batch size. Online
(``vllm serve`` + ``vllm bench serve``, :mod:`benchmarks.online`): one server per method at a
time, the method order rotated per repeat. Writes ``results.json`` and ``report.md`` to
``--out`` (default ``benchmarks/results/<date>-<what it measures>``). Example::

    python -m benchmarks.run --methods baseline,specstream,ngram,suffix --workloads mtbench \\
        --batch-sizes 1,4,16 --rounds 2 --per-level 8 --max-tokens 96 --dtype float32
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from . import online
from .methods import ALL_METHODS, Method, build_methods, default_streams
from .offline import rotated, run_offline
from .report import render
from .system import machine_info
from .workloads import WORKLOADS, fit_prompts, load_workload, prompts_digest

RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--methods", default="baseline,specstream,ngram,suffix",
                   help=f"comma list from {','.join(ALL_METHODS)}; `<specstream method>+<ablation>`; "
                        "`<specstream method>@<draft pass>` (separate, fused, auto); "
                        "`-alt` for the --alt-streams checkpoint")
    p.add_argument("--streams", help="specstream checkpoint (default with the default model: shipped)")
    p.add_argument("--alt-streams", help="a second checkpoint: methods specstream-alt, ...-streams-alt")
    p.add_argument("--specstream-k", type=int, default=4, help="specstream num_speculative_tokens")
    p.add_argument("--medusa", help="Medusa heads dir for vLLM's built-in medusa method")
    p.add_argument("--medusa-k", type=int, help="medusa num_speculative_tokens (default: heads)")
    p.add_argument("--suffix-k", type=int, default=8, help="suffix num_speculative_tokens")
    p.add_argument("--mode", choices=("offline", "online", "both"), default="offline")
    p.add_argument("--workloads", default="mtbench", help=f"comma list from {','.join(WORKLOADS)} "
                   "(offline: one table each; online: the first)")
    p.add_argument("--prompts", help="JSONL file with `prompt` or `messages` per line (replaces --workloads)")
    p.add_argument("--num-prompts", type=int, help="use the first N prompts of each workload")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto", help="auto (specstream_vllm.dtype_choice), bfloat16 "
                   "or float32 (token-identical greedy outputs)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (fast start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE per engine")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for engines (default: vLLM's)")
    g = p.add_argument_group("offline")
    g.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16])
    g.add_argument("--rounds", type=int, default=2, help="rounds per batch size")
    g.add_argument("--rounds-at", default="", help="rounds per batch size, e.g. 16:1")
    g.add_argument("--per-level", type=int, default=8, help="prompts per round: max(N, batch size)")
    g.add_argument("--warmup-single", type=int, default=0,
                   help="single-request warm-ups (48 tokens each) after the batch warm-up")
    g.add_argument("--timeout", type=float, default=1800, help="s per engine start / generate call")
    g = p.add_argument_group("online")
    g.add_argument("--concurrency", type=_ints, default=[1, 4, 16])
    g.add_argument("--requests-per-level", type=int,
                   help="each level runs the first max(N, concurrency) prompts (default: all)")
    g.add_argument("--repeats", type=int, default=1, help="server runs per method (order rotated)")
    g.add_argument("--startup-timeout", type=float, default=600, help="s to /health")
    g.add_argument("--request-timeout", type=float, default=3600, help="s per level")
    p.add_argument("--out", help="results folder (default: benchmarks/results/<date>-<what>)")
    args = p.parse_args(argv)
    args.rounds_at = {int(b): int(r) for b, r in (x.split(":") for x in args.rounds_at.split(",") if x)}
    return args


def default_folder(args: argparse.Namespace, workloads: list[str], today: dt.date) -> Path:
    """``<date>-<workloads>-batch<sizes>`` / ``-online-concurrency<levels>``: what it measures."""
    what = ["-".join(workloads).replace(" ", "-")]
    if args.mode != "online":
        what.append("batch" + "-".join(map(str, args.batch_sizes)))
    if args.mode != "offline":
        what.append("online-concurrency" + "-".join(map(str, args.concurrency)))
    return RESULTS / f"{today.isoformat()}-{'-'.join(what)}"


def run_online_mode(methods: list[Method], base_job: dict[str, Any], args: argparse.Namespace,
                    folder: Path, save: Callable[[], None], runs: list[dict[str, Any]]) -> None:
    """Each method ``--repeats`` times, in rotated order. A method that keeps state across
    requests (suffix caches answers) gets a server per level; then every method does, or the
    others would meet each level on a server warmed by the levels before."""
    fresh_levels = any(m.keeps_request_state for m in methods)
    for r in range(args.repeats):
        for m in rotated(methods, r):
            job = {**base_job, "speculative_config": m.speculative_config,
                   "engine_args": m.engine_args, "env": m.env}
            tag = f"online-{m.name}-r{r}"
            print(f"[bench] {tag}: starting server", flush=True)
            levels = [[c] for c in job["concurrencies"]] if fresh_levels else [job["concurrencies"]]
            parts = [online.run_method({**job, "concurrencies": c}, folder / "logs",
                                       tag + (f"-c{c[0]}" if fresh_levels else ""), args.startup_timeout,
                                       args.request_timeout, args.kv_cache_gib, args.threads)
                     for c in levels]
            runs.append({"method": m.name, "repeat": r, **_merge(parts)})
            print(f"[bench] {tag}: {_one_line(runs[-1])}", flush=True)
            save()


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-level records of one method as one record (peak RSS and start time: the worst)."""
    failed = [p for p in parts if p["status"] != "ok"]
    if failed or len(parts) == 1:
        return (failed or parts)[0]
    return {"status": "ok", "levels": [x for p in parts for x in p["levels"]],
            "engine_start_s": max(p["engine_start_s"] for p in parts),
            "peak_rss_mib": max(p["peak_rss_mib"] for p in parts),
            "max_load1": max(p.get("max_load1", 0.0) for p in parts),
            "wall_s": sum(p["wall_s"] for p in parts), "log": [p["log"] for p in parts]}


def _one_line(res: dict[str, Any]) -> str:
    if res["status"] != "ok":
        return "FAILED " + res.get("error", "").strip().splitlines()[0][:300]
    figs = ", ".join(f"{p['concurrency']}: {p['tokens_per_s']:.1f} tok/s" for p in res["levels"])
    return f"ok (start {res['engine_start_s']:.0f} s; {figs}; peak RSS {res['peak_rss_mib']:.0f} MiB)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.streams = default_streams(args.model, args.streams)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    methods = build_methods(names, medusa=args.medusa, streams=args.streams,
                            specstream_k=args.specstream_k, medusa_k=args.medusa_k,
                            suffix_k=args.suffix_k, alt_streams=args.alt_streams)
    skipped = [f"{m.name} ({m.skip_reason})" for m in methods if m.skip_reason]
    if skipped:  # never time such a method: it would be a second no-speculation engine
        print(f"python -m benchmarks.run: cannot run {'; '.join(skipped)}", file=sys.stderr)
        return 2
    if args.model is None:
        from specstream_vllm.default_model import default_model_dir
        args.model = str(default_model_dir())
    from specstream_vllm.dtype_choice import resolve_dtype
    args.dtype = resolve_dtype(args.dtype, enforce_eager=args.enforce_eager)

    workloads = [f"prompts file {Path(args.prompts).name}"] if args.prompts else \
        [w.strip() for w in args.workloads.split(",") if w.strip()]
    lookahead = max([args.suffix_k, args.specstream_k, args.medusa_k or 0, 4]) + 1
    prompts_of = {}
    for w in workloads:
        kept, _ = fit_prompts(load_workload(w, args.prompts), args.model,
                              args.max_model_len - args.max_tokens - lookahead)
        prompts_of[w] = kept[:args.num_prompts] if args.num_prompts else kept
        if not prompts_of[w]:
            print(f"[bench] {w}: no prompts fit the context", file=sys.stderr)
            return 2
    folder = Path(args.out) if args.out else default_folder(args, workloads, dt.date.today())
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {"timestamp": dt.datetime.now().isoformat(timespec="seconds"),
                 "command": shlex.join([sys.executable, "-m", "benchmarks.run", *argv]),
                 "model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
                 "workload": ", ".join(workloads), "num_prompts": sum(map(len, prompts_of.values())),
                 "prompts_digest": prompts_digest([p for ps in prompts_of.values() for p in ps]),
                 "machine": machine_info()},
        "methods": [m.to_json() for m in methods]}
    raw = folder / "results.json"

    def save() -> None:
        tmp = raw.with_suffix(".partial")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(raw)

    if args.mode in ("offline", "both"):
        convs = {w: [[dict(m) for m in p.messages] for p in ps] for w, ps in prompts_of.items()}
        for w, cs in convs.items():
            need = sum(args.rounds_at.get(b, args.rounds) * max(args.per_level, b) for b in args.batch_sizes)
            if len(cs) < need:
                print(f"[bench] {w}: {len(cs)} prompts for {need}: prompts repeat (flagged in the "
                      "report)", flush=True)
        results.update(run_offline(methods, convs, args, folder / "engines",
                                   lambda part: (results.update(part), save())))
        save()
    if args.mode in ("online", "both"):
        first = prompts_of[workloads[0]]
        base_job = {"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens,
                    "max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager,
                    "seed": args.seed, "concurrencies": args.concurrency,
                    "requests_per_level": args.requests_per_level,
                    "conversations": [[dict(m) for m in p.messages] for p in first]}
        results["online"] = {"runs": []}
        run_online_mode(methods, base_job, args, folder, save, results["online"]["runs"])
        save()
    md = render(results, folder.name)
    (folder / "report.md").write_text(md)
    print(f"[bench] wrote {raw} and {folder / 'report.md'}\n\n{md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
