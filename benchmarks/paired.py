"""Paired benchmark for a busy machine: every method's engine stays up, and the methods
take turns on the same batch size, round after round, with fresh prompts each round.

On a shared 2-core CPU the load of other jobs changes minute to minute; methods timed one
after the other (benchmarks.run) then differ by the load they met. Here each round runs
every method back to back on its own disjoint prompts (rotating the order), and the
ratio to no speculation is taken within the round; the table reports the median over
rounds. Suffix's response cache never sees a prompt twice.

    python -m benchmarks.paired --methods baseline,ngram,suffix,specstream \\
        --streams STREAMS --workload mixed --batch-sizes 1,4,16,32,64 --rounds 2 \\
        --per-level 6 --max-tokens 48 --out benchmarks/results/paired

Several workloads in one run (``--workloads mtbench,sharegpt,code``): the engines stay up,
each workload gets its own levels and prompts, and the report has one table per workload
with the acceptance per position and, for specstream, the drafts taken per source
(streams / suffix / ngram match). The match-source comparison of the README:

    python -m benchmarks.paired --methods baseline,specstream-streams,specstream-suffix,ngram,suffix \\
        --streams STREAMS --workloads mtbench,sharegpt,code --batch-sizes 1,16 --rounds 2 \\
        --per-level 8 --max-tokens 128 --dtype float32 --out benchmarks/results/match

Each engine runs in a child process (``python -m benchmarks.paired --child``) that reads
one JSON command per line on stdin and writes its answer to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .methods import build_methods, default_streams
from .offline import REPO_ROOT, WARMUP_CONVERSATIONS, engine_env
from .specmetrics import from_vllm_metrics
from .system import machine_info


# ------------------------------------------------------------------ child

def child(job_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job["out_dir"])
    llm = LLM(model=job["model"], dtype=job["dtype"], speculative_config=job["speculative_config"],
              max_model_len=job["max_model_len"], seed=0, disable_log_stats=False,
              max_num_seqs=job["max_num_seqs"], enforce_eager=job["enforce_eager"],
              **job.get("engine_args", {}))
    warm = SamplingParams(temperature=0.0, max_tokens=16)
    llm.chat(WARMUP_CONVERSATIONS[:job["max_num_seqs"]], warm, use_tqdm=False)
    # single requests too (batch-1 shapes compiled, a draft policy's step costs measured at
    # batch 1 before the first timed round)
    for conv in WARMUP_CONVERSATIONS[-job.get("warmup_single", 0):] if job.get("warmup_single") else []:
        llm.chat([conv], SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
    (out_dir / "ready").write_text("ok")
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stop"):
            break
        before = from_vllm_metrics(llm.get_metrics())
        t = time.perf_counter()
        outs = llm.chat(cmd["conversations"], params, use_tqdm=False)
        secs = time.perf_counter() - t
        spec = from_vllm_metrics(llm.get_metrics()) - before
        ids = [list(o.outputs[0].token_ids) for o in outs]
        res = {"seconds": secs, "tokens": sum(len(x) for x in ids), "token_ids": ids,
               "spec": spec.to_json()}
        tmp = out_dir / f".{cmd['n']}.json"
        tmp.write_text(json.dumps(res))
        tmp.replace(out_dir / f"{cmd['n']}.json")
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------ parent

class Engine:
    def __init__(self, name: str, spec: dict | None, args, folder: Path,
                 engine_args: dict | None = None, extra_env: dict | None = None):
        self.name, self.dir = name, folder / name
        self.dir.mkdir(parents=True, exist_ok=True)
        for f in self.dir.glob("*.json"):
            f.unlink()
        (self.dir / "ready").unlink(missing_ok=True)
        job = {"model": args.model, "dtype": args.dtype, "speculative_config": spec,
               "max_model_len": args.max_model_len, "max_tokens": args.max_tokens,
               "max_num_seqs": max(max(args.batch_sizes), 16), "enforce_eager": args.enforce_eager,
               "warmup_single": args.warmup_single, "engine_args": engine_args or {},
               "out_dir": str(self.dir)}
        (self.dir / "job.json").write_text(json.dumps(job))
        env = dict(engine_env(args.kv_cache_gib),
                   SPECSTREAM_POLICY_DUMP=str(self.dir / "policy.json"), **(extra_env or {}))
        self.log = (self.dir / "engine.log").open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.paired", "--child",
                                      str(self.dir / "job.json")], stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(REPO_ROOT), start_new_session=True, text=True)
        self.n = 0

    def wait_ready(self, timeout: float) -> None:
        t = time.time()
        while not (self.dir / "ready").exists():
            if self.proc.poll() is not None or time.time() - t > timeout:
                raise RuntimeError(f"{self.name}: engine failed to start, see {self.dir / 'engine.log'}")
            time.sleep(2)

    def run(self, conversations: list, timeout: float) -> dict:
        self.n += 1
        self.proc.stdin.write(json.dumps({"n": self.n, "conversations": conversations}) + "\n")
        self.proc.stdin.flush()
        path, t = self.dir / f"{self.n}.json", time.time()
        while not path.exists():
            if self.proc.poll() is not None or time.time() - t > timeout:
                raise RuntimeError(f"{self.name}: engine died or timed out, see {self.dir / 'engine.log'}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def stop(self) -> None:
        import signal
        try:
            self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--methods", default="baseline,specstream")
    p.add_argument("--streams", help="specstream checkpoint (default with the default model: the "
                                     "shipped streams)")
    p.add_argument("--alt-streams", help="a second stream checkpoint: methods specstream-alt, "
                                         "specstream-streams-alt")
    p.add_argument("--specstream-k", type=int, default=4,
                   help="num_speculative_tokens of the specstream methods")
    p.add_argument("--workload", default="mixed")
    p.add_argument("--workloads", help="comma list (mtbench,sharegpt,code,...): overrides --workload")
    p.add_argument("--rounds-at", default="",
                   help="rounds per batch size, e.g. 16:1 (default --rounds everywhere)")
    p.add_argument("--batch-sizes", default="1,4,16,32,64")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--per-level", type=int, default=6, help="prompts per level: max(N, batch)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--warmup-single", type=int, default=0,
                   help="single-request warm-ups (48 tokens each) after the batch warm-up")
    p.add_argument("--kv-cache-gib", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="benchmarks/results/paired")
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    names = [n.strip() for n in args.methods.split(",")]
    args.streams = default_streams(args.model, args.streams)
    methods = build_methods(names, streams=args.streams, alt_streams=args.alt_streams,
                            specstream_k=args.specstream_k)
    skipped = [f"{m.name} ({m.skip_reason})" for m in methods if m.skip_reason]
    if skipped:     # never run such a method as a second baseline
        p.error("cannot run " + "; ".join(skipped))
    if args.model is None:
        from specstream_vllm.default_model import default_model_dir
        args.model = str(default_model_dir())
    from specstream_vllm.dtype_choice import resolve_dtype
    args.dtype = resolve_dtype(args.dtype)
    from .run import fit_prompts
    from .workloads import load_workload
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rounds_at = {int(b): int(r) for b, r in (x.split(":") for x in args.rounds_at.split(",") if x)}
    workloads = [w.strip() for w in (args.workloads or args.workload).split(",")]
    convs_of: dict[str, list] = {}
    for w in workloads:
        prompts, _ = fit_prompts(load_workload(w, None, None), args.model,
                                 args.max_model_len - args.max_tokens - 64)  # llm.chat adds a system turn
        need = sum(rounds_at.get(b, args.rounds) * max(args.per_level, b) for b in args.batch_sizes)
        if len(prompts) < need:
            print(f"[paired] {w}: only {len(prompts)} prompts for {need}: prompts repeat across "
                  "rounds", flush=True)
        convs_of[w] = [[dict(m) for m in pr.messages] for pr in prompts]
    engines: list[Engine] = []
    results: dict[str, Any] = {"meta": {"command": " ".join([sys.executable, "-m", "benchmarks.paired", *argv]),
                                        "dtype": args.dtype, "machine": machine_info(),
                                        "methods": [m.to_json() for m in methods]}, "levels": []}
    load = []
    try:
        for m in methods:  # one at a time: concurrent compilation on 2 busy cores times out
            e = Engine(m.name, m.speculative_config, args, folder, m.engine_args, m.env)
            engines.append(e)
            e.wait_ready(args.timeout)
            print(f"[paired] {e.name}: ready", flush=True)
        for workload, b in [(w, b) for w in workloads for b in args.batch_sizes]:
            convs = convs_of[workload]
            cursor = sum(rounds_at.get(x, args.rounds) * max(args.per_level, x)
                         for x in args.batch_sizes[:args.batch_sizes.index(b)])
            level = {"workload": workload, "batch_size": b, "rounds": [], "repeated": []}
            for r in range(rounds_at.get(b, args.rounds)):
                n = max(args.per_level, b)
                chunk = [convs[(cursor + i) % len(convs)] for i in range(n)]
                # prompts an engine has answered before: suffix caches remember the answers
                level["repeated"].append(sum(cursor + i >= len(convs) for i in range(n)))
                cursor += n
                order = engines[r % len(engines):] + engines[:r % len(engines)]
                rnd = {}
                for e in order:
                    load.append(os.getloadavg()[0])
                    outs, secs, toks, spec, ids = [], 0.0, 0, None, []
                    for i in range(0, n, b):
                        res = e.run(chunk[i:i + b], args.timeout)
                        secs += res["seconds"]
                        toks += res["tokens"]
                        ids += res["token_ids"]
                        spec = res["spec"] if spec is None else _add(spec, res["spec"])
                    rnd[e.name] = {"seconds": secs, "tokens": toks, "tok_s": toks / secs,
                                   "spec": spec, "token_ids": ids}
                level["rounds"].append(rnd)
                base = rnd.get("baseline")
                line = " ".join(f"{k}={v['tok_s']:.1f}" + (f"({v['tok_s'] / base['tok_s']:.2f}x)" if base else "")
                                for k, v in rnd.items())
                print(f"[paired] {workload} batch {b} round {r}: {line} load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
            results["levels"].append(level)
            (folder / "results.json").write_text(json.dumps(results))
    finally:
        for e in engines:
            e.stop()
    results["meta"]["load1_mean"] = statistics.mean(load) if load else None
    results["meta"]["load1_max"] = max(load) if load else None
    for e in engines:
        pol = e.dir / "policy.json"
        if pol.exists():
            results.setdefault("policy", {})[e.name] = json.loads(pol.read_text())
    (folder / "results.json").write_text(json.dumps(results))
    md = render(results)
    (folder / "report.md").write_text(md)
    print(md)
    return 0


def _add(a: dict, b: dict) -> dict:
    from .specmetrics import SpecCounters
    return (SpecCounters.from_json(a) + SpecCounters.from_json(b)).to_json()


def render(results: dict) -> str:
    """One table per workload: tok/s and its ratio to no speculation (median of rounds),
    greedy equality, mean acceptance length, acceptance per position, drafts per source
    (share of drafts, their mean acceptance length) and the draft policy's off share."""
    from .specmetrics import SpecCounters
    names = list(results["levels"][0]["rounds"][0]) if results["levels"] else []
    out = []
    workloads = list(dict.fromkeys(lv.get("workload", "-") for lv in results["levels"]))
    for w in workloads:
        rows = [f"#### {w}" if len(workloads) > 1 or w != "-" else "",
                "| method | batch | tok/s per round | vs baseline (median of rounds) | = baseline | "
                "tokens per step | mean accept len | accept per pos | "
                "drafts by source (share, accept len) | steps w/o drafts | draft tok/step |",
                "|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for name in names:
            for lv in [x for x in results["levels"] if x.get("workload", "-") == w]:
                rnds = lv["rounds"]
                tps = [r[name]["tok_s"] for r in rnds]
                ratios = [r[name]["tok_s"] / r["baseline"]["tok_s"] for r in rnds if "baseline" in r]
                same = [a == b for r in rnds if "baseline" in r
                        for a, b in zip(r[name]["token_ids"], r["baseline"]["token_ids"])]
                spec = SpecCounters()
                for r in rnds:
                    spec = spec + SpecCounters.from_json(r[name]["spec"])
                s = spec.to_json()
                al = s.get("mean_acceptance_length")
                share = s.get("no_spec_step_share")
                pos = " / ".join(f"{x:.2f}" for x in s.get("acceptance_per_pos") or []) or "-"
                by = s.get("by_source") or {}
                src = ", ".join(f"{k} {100 * v['draft_share']:.0f}% ({v['mean_acceptance_length']:.2f})"
                                for k, v in by.items() if v.get("draft_share")) or "-"
                ratio = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                         if ratios else "-")
                # tokens per target step of a request (each request-step yields 1 + accepted):
                # the call reduction, counting steps without drafts too
                toks = sum(r[name]["tokens"] for r in rnds)
                per_step = toks / max(toks - spec.accepted_tokens, 1)
                rows.append(
                    f"| {name} | {lv['batch_size']} | {' / '.join(f'{x:.1f}' for x in tps)} | "
                    f"{ratio} | {100 * sum(same) / max(len(same), 1):.0f}% | {per_step:.2f} | "
                    f"{'-' if al is None else f'{al:.2f}'} | {pos} | {src} | "
                    f"{'-' if share is None else f'{100 * share:.0f}%'} | "
                    f"{'-' if share is None else format(s['draft_tokens_per_step'], '.2f')} |")
        out.append("\n".join(x for x in rows if x))
        seen = [f"batch {lv['batch_size']} round {r}: {k}" for lv in results["levels"]
                if lv.get("workload", "-") == w for r, k in enumerate(lv.get("repeated", [])) if k]
        if seen:
            out.append(f"{w}: prompts answered earlier in this run (the workload ran out; suffix "
                       f"caches remember their answers, so these rounds favour them): " + ", ".join(seen))
    m = results["meta"]
    mach = m.get("machine") or {}
    out.append(f"machine: {mach.get('cpu_model', '?')}, {mach.get('logical_cores', '?')} logical cores, "
               f"CPU flags: {', '.join(mach.get('cpu_flags_of_note') or []) or '-'}; dtype {m.get('dtype')}")
    return "\n\n".join(out) + (f"\n\nload average (1 min) during the runs: mean "
                                f"{m.get('load1_mean') or 0:.1f}, max {m.get('load1_max') or 0:.1f} "
                                f"on {os.cpu_count()} cores\n")


if __name__ == "__main__":
    sys.exit(main())
