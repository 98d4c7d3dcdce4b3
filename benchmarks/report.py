"""Benchmark reports from results files: one ``report.md`` per results folder, and the index.

    python -m benchmarks.report RESULTS_DIR              # RESULTS_DIR/report.md
    python -m benchmarks.report --index docs/benchmarks  # docs/benchmarks/README.md

Every figure comes from ``results.json`` (written by ``benchmarks.run``): the offline
rotation's ``levels`` (tok/s per round, ratio to the same round's baseline, greedy equality,
acceptance from the summed spec-decode counters) and the online ``runs`` (``vllm bench serve``
per concurrency level). Each section states the command, the machine and the dtype.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Iterable

from specstream_vllm.spec_counters import SpecCounters


def spread(values: Iterable[float]) -> dict[str, float] | None:
    """Median, min and max of a list (None when empty)."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _fmt(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _fmt_spread(s: dict[str, float] | None, digits: int = 1, suffix: str = "") -> str:
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return _fmt(s["median"], digits, suffix)
    return f"{s['median']:.{digits}f}{suffix} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _acceptance_cols(spec: SpecCounters) -> list[str]:
    """mean acceptance length, per position, drafts by source, steps without drafts, draft tok/step."""
    s = spec.summary()
    by = s.get("by_source") or {}
    share = s.get("no_spec_step_share")
    return [_fmt(s["mean_acceptance_length"], 2),
            " / ".join(f"{x:.2f}" for x in s["acceptance_per_pos"]) or "-",
            ", ".join(f"{k} {100 * v['draft_share']:.0f}% ({v['mean_acceptance_length']:.2f})"
                      for k, v in by.items() if v.get("draft_share")) or "-",
            _fmt(None if share is None else 100 * share, 0, "%"),
            _fmt(s.get("draft_tokens_per_step"), 2)]


# ------------------------------------------------------------------ offline (rotation)

def _equality_reference(name: str) -> str:
    """Greedy output is compared within one dtype: ``X%bfloat16`` against ``baseline%bfloat16``
    (other dtypes give other text); speed ratios are always against the run's ``baseline``."""
    _, pct, dtype = name.partition("%")
    return f"baseline%{dtype}" if pct else "baseline"


def offline_tables(levels: list[dict[str, Any]]) -> list[str]:
    """One table per workload: tok/s per round, ratio to no speculation (median of rounds),
    greedy equality, tokens per target step, then acceptance; and rounds whose prompts the
    engines had answered before."""
    names = list(levels[0]["rounds"][0]) if levels else []
    workloads = list(dict.fromkeys(lv.get("workload", "-") for lv in levels))
    out = []
    for w in workloads:
        mine = [lv for lv in levels if lv.get("workload", "-") == w]
        rows = [f"#### {w}" if w != "-" else "",
                "| method | batch | tok/s per round | vs baseline (median of rounds) | = baseline | "
                "tokens per step | mean accept len | accept per pos | "
                "drafts by source (share, accept len) | steps w/o drafts | draft tok/step |",
                "|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for name in names:
            for lv in mine:
                rnds = [r for r in lv["rounds"] if name in r]
                ratios = [r[name]["tok_s"] / r["baseline"]["tok_s"] for r in rnds if "baseline" in r]
                ref = _equality_reference(name)
                same = [a == b for r in rnds if ref in r
                        for a, b in zip(r[name]["token_ids"], r[ref]["token_ids"])]
                spec = SpecCounters()
                for r in rnds:
                    spec = spec + SpecCounters.from_json(r[name]["spec"])
                ratio = (f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
                         if ratios else "-")
                # each request-step yields 1 + accepted tokens: the reduction in target calls
                toks = sum(r[name]["tokens"] for r in rnds)
                per_step = toks / max(toks - spec.accepted_tokens, 1)
                rows.append("| " + " | ".join(
                    [name, str(lv["batch_size"]), " / ".join(f"{r[name]['tok_s']:.1f}" for r in rnds),
                     ratio, f"{100 * sum(same) / len(same):.0f}%" if same else "-", f"{per_step:.2f}",
                     *_acceptance_cols(spec)]) + " |")
        out.append("\n".join(x for x in rows if x))
        seen = [f"batch {lv['batch_size']} round {r}: {k}" for lv in mine
                for r, k in enumerate(lv.get("repeated", [])) if k]
        if seen:
            out.append(f"{w}: prompts answered earlier in this run (the workload ran out; suffix "
                       "caches remember their answers, so these rounds favour them): " + ", ".join(seen))
    return out


# ------------------------------------------------------------------ online (vllm bench serve)

def aggregate_online(runs: list[dict[str, Any]], baseline: str = "baseline") -> dict[str, Any]:
    """Per method and concurrency: tok/s and its ratio to the same repeat's baseline (median,
    min-max over repeats), TTFT/TPOT medians and p90s, summed counters, failures."""
    base = {(r["repeat"], p["concurrency"]): p["tokens_per_s"] for r in runs
            if r["method"] == baseline and r.get("status") == "ok" for p in r["levels"]}
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mruns = [r for r in runs if r["method"] == name]
        ok = [r for r in mruns if r.get("status") == "ok"]
        rows = []
        for c in sorted({p["concurrency"] for r in ok for p in r["levels"]}):
            pts = [(r["repeat"], p) for r in ok for p in r["levels"] if p["concurrency"] == c]
            spec = SpecCounters()
            for _, p in pts:
                spec = spec + SpecCounters.from_json(p.get("spec", {}))
            rows.append({
                "concurrency": c, "tokens_per_s": spread(p["tokens_per_s"] for _, p in pts),
                "ratio": spread(p["tokens_per_s"] / base[(rep, c)] for rep, p in pts
                                if base.get((rep, c))),
                "spec": spec, "failed_requests": sum(p.get("failed", 0) for _, p in pts),
                **{m: {s: spread(v for _, p in pts if (v := (p.get(m) or {}).get(s)) is not None)
                       for s in ("median_ms", "p90_ms")} for m in ("ttft", "tpot", "latency")}})
        out[name] = {"status": "ok" if ok else "failed", "rows": rows,
                     "errors": [r.get("error", "") for r in mruns if r.get("status") != "ok"][:3],
                     "peak_rss_mib": max((r.get("peak_rss_mib") or 0 for r in ok), default=None),
                     "max_load1": max((r.get("max_load1") or 0 for r in mruns), default=None)}
    return out


def online_table(agg: dict[str, Any]) -> str:
    lines = ["| method | conc. | tok/s median (min-max) | vs baseline | TTFT med / p90 ms | "
             "TPOT med / p90 ms | failed req | mean accept len | accept per pos | "
             "drafts by source (share, accept len) | steps w/o drafts | draft tok/step | "
             "peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for name, m in agg.items():
        for row in m["rows"]:
            def med(metric: str, stat: str) -> float | None:
                s = row[metric][stat]
                return s["median"] if s else None
            lines.append("| " + " | ".join(
                [name, str(row["concurrency"]), _fmt_spread(row["tokens_per_s"]),
                 _fmt_spread(row["ratio"], 2, "x"),
                 f"{_fmt(med('ttft', 'median_ms'), 0)} / {_fmt(med('ttft', 'p90_ms'), 0)}",
                 f"{_fmt(med('tpot', 'median_ms'), 1)} / {_fmt(med('tpot', 'p90_ms'), 1)}",
                 str(row["failed_requests"]), *_acceptance_cols(row["spec"]),
                 _fmt(m["peak_rss_mib"], 0)]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ one results file

def _machine(mach: dict[str, Any]) -> str:
    if not mach:
        return "unknown"
    return (f"{mach.get('cpu_model', '?')}, {mach.get('logical_cores', '?')} logical cores "
            f"({mach.get('affinity_cores')} usable), {mach.get('ram_gib', '?')} GiB RAM, "
            f"GPU {mach.get('gpu') or 'none'}, CPU flags "
            f"{', '.join(mach.get('cpu_flags_of_note') or []) or '-'}; {mach.get('vllm_dist', 'vllm')} "
            f"{mach.get('vllm')}, torch {mach.get('torch')}, python {mach.get('python')}")


def render(results: dict[str, Any], title: str, level: int = 1) -> str:
    """The report of one results file (``level``: the heading level of its title)."""
    meta = results["meta"]
    h = "#" * level
    out = [f"{h} {title}", "", f"- command: `{meta.get('command', '?')}`",
           f"- machine: {_machine(meta.get('machine') or {})}",
           f"- dtype {meta.get('dtype')}, greedy, chat template"
           + (f"; model `{meta['model']}`" if meta.get("model") else "")
           + (f", up to {meta['max_tokens']} new tokens" if meta.get("max_tokens") else "")
           + (f"; workload {meta['workload']} ({meta.get('num_prompts')} prompts, digest "
              f"{meta.get('prompts_digest')})" if meta.get("workload") else "")]
    if meta.get("note"):
        out.append(f"- note: {meta['note']}")
    levels = results.get("levels") or (results.get("offline") or {}).get("levels")
    if levels:
        load = results.get("load1_mean", meta.get("load1_mean"))
        out += ["", f"{h}# Offline (`vllm.LLM`): engines up together, methods take turns per round",
                "", "tok/s = output tokens / wall time of the generate calls; the ratio is to no "
                "speculation in the same round; '= baseline': greedy token ids equal to the "
                "baseline's (a '%dtype' method: to 'baseline%dtype'); mean acceptance length "
                "counts the bonus token (vLLM's convention).", "",
                *"\n\n".join(offline_tables(levels)).split("\n")]
        if load is not None:
            out += ["", f"load average (1 min) during the runs: mean {load:.1f}, max "
                    f"{results.get('load1_max', meta.get('load1_max')) or 0:.1f}"]
    if results.get("online"):
        agg = aggregate_online(results["online"]["runs"])
        out += ["", f"{h}# Online (`vllm serve`)", "", online_table(agg)]
        failed = [f"- **{n}**: failed: {(a['errors'] or ['?'])[0].strip().splitlines()[0][:300]}"
                  for n, a in agg.items() if a["status"] != "ok"]
        out += ["", *failed] if failed else []
    methods = results.get("methods") or meta.get("methods") or []
    skipped = [f"- **{m['name']}**: skipped: {m['skip_reason']}" for m in methods if m.get("skip_reason")]
    return "\n".join(out + (["", *skipped] if skipped else [])) + "\n"


def rerender(folder: Path) -> str:
    """Rewrite ``folder/report.md`` from ``folder/results.json``; return it."""
    md = render(json.loads((folder / "results.json").read_text()), folder.name)
    (folder / "report.md").write_text(md)
    return md


INDEX_HEAD = """# Benchmark results

Generated by `python -m benchmarks.report --index docs/benchmarks` from each folder's
`results.json`; each folder also holds its own `report.md`. Folder names: the date of the
run and what it measures. Runs recorded as `benchmarks.paired` are the offline mode of
`benchmarks.run`, which takes the same flags.
"""


def write_index(root: Path) -> Path:
    """``root/README.md``: every results folder's report as one section (newest first)."""
    folders = sorted((p for p in root.iterdir() if (p / "results.json").is_file()), reverse=True)
    parts = [INDEX_HEAD]
    for folder in folders:
        parts.append(render(json.loads((folder / "results.json").read_text()),
                            f"[{folder.name}]({folder.name}/report.md)", level=2))
    (root / "README.md").write_text("\n".join(parts))
    return root / "README.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", help="a results folder: rewrite its report.md")
    ap.add_argument("--index", metavar="ROOT", help="ROOT/README.md from every results folder under ROOT")
    a = ap.parse_args(argv)
    if a.index:
        print(f"wrote {write_index(Path(a.index))}")
    elif a.folder:
        print(rerender(Path(a.folder)))
    else:
        ap.error("give a results folder or --index ROOT")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
