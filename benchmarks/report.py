"""Aggregation over repeats, the markdown report and the PNG plots.

Raw per-run records (one per method, repeat and mode) go in; per-method, per-batch-size (offline)
or per-concurrency (online) rows come out: median and min/max of tokens/s and of the ratio to the
baseline of the same repeat, acceptance from the summed spec-decode counters, output equality.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable

from .specmetrics import SpecCounters

Row = dict[str, Any]


def spread(values: Iterable[float]) -> dict[str, float] | None:
    """Median, min and max of a list (None when empty)."""
    xs = [float(v) for v in values]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or the base is not positive."""
    if value is None or base is None or base <= 0:
        return None
    return value / base


def equal_fraction(outputs: list[list[int]], reference: list[list[int]]) -> float | None:
    """Fraction of prompts whose token ids equal the reference's (None if counts differ)."""
    if not reference or len(outputs) != len(reference):
        return None
    return sum(a == b for a, b in zip(outputs, reference)) / len(reference)


def _points(run: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return run.get("phases" if mode == "offline" else "levels", []) if run.get("status") == "ok" else []


def aggregate(runs: list[dict[str, Any]], mode: str, baseline: str = "baseline") -> dict[str, Any]:
    """Per method: status, errors, and a list of rows, one per batch size / concurrency.

    ``runs`` are records with ``method``, ``repeat`` and the engine result (``status``,
    ``phases`` or ``levels``, ``peak_rss_mib``). Ratios use the baseline of the same repeat.
    """
    key = "batch_size" if mode == "offline" else "concurrency"
    base_tps: dict[tuple[int, int], float] = {}
    base_ids: dict[int, list[list[int]]] = {}
    for run in runs:
        if run["method"] != baseline:
            continue
        for p in _points(run, mode):
            base_tps[(run["repeat"], p[key])] = p["tokens_per_s"]
            if "token_ids" in p:
                base_ids.setdefault(p[key], p["token_ids"])

    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["method"] for r in runs):
        mruns = [r for r in runs if r["method"] == name]
        ok = [r for r in mruns if r.get("status") == "ok"]
        rows: list[Row] = []
        for x in sorted({p[key] for r in ok for p in _points(r, mode)}):
            pts = [(r["repeat"], p) for r in ok for p in _points(r, mode) if p[key] == x]
            spec = SpecCounters()
            for _, p in pts:
                spec = spec + SpecCounters.from_json(p.get("spec", {}))
            ratios = [q for rep, p in pts
                      if (q := ratio(p["tokens_per_s"], base_tps.get((rep, x)))) is not None]
            row: Row = {key: x, "tokens_per_s": spread(p["tokens_per_s"] for _, p in pts),
                        "ratio": spread(ratios), "spec": spec.to_json()}
            if mode == "offline":
                first = pts[0][1].get("token_ids")
                row["equal_to_baseline"] = (equal_fraction(first, base_ids[x])
                                            if first is not None and x in base_ids else None)
            else:
                for metric in ("ttft", "tpot", "latency"):
                    row[metric] = {s: spread(v for _, p in pts
                                             if (v := (p.get(metric) or {}).get(s)) is not None)
                                   for s in ("median_ms", "p90_ms")}
                row["failed_requests"] = sum(p.get("failed", 0) for _, p in pts)
            rows.append(row)
        status = "ok" if ok else (mruns[0].get("status", "failed") if mruns else "missing")
        out[name] = {
            "status": status,
            "errors": [r.get("error") for r in mruns if r.get("status") not in ("ok", None)
                       and r.get("error")][:3],
            "peak_rss_mib": max((r.get("peak_rss_mib") or 0 for r in ok), default=None),
            "engine_start_s": spread(r["engine_start_s"] for r in ok if "engine_start_s" in r),
            "max_load1": max((r["max_load1"] for r in mruns if r.get("max_load1") is not None),
                             default=None),
            "rows": rows,
        }
    return out


# ------------------------------------------------------------------ markdown

def _fmt(x: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _fmt_spread(s: dict[str, float] | None, digits: int = 1, suffix: str = "") -> str:
    if not s:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return _fmt(s["median"], digits, suffix)
    return f"{s['median']:.{digits}f}{suffix} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _fmt_pos(rates: list[float]) -> str:
    return " / ".join(f"{r:.2f}" for r in rates) if rates else "-"


def _policy_cols(spec: dict[str, Any]) -> str:
    """specstream's draft policy: share of decode steps without drafts, draft tokens per step."""
    share = spec.get("no_spec_step_share")
    return f"{_fmt(None if share is None else 100 * share, 0, '%')} | {_fmt(spec.get('draft_tokens_per_step'), 2)}"


def _params(n: int | None) -> str:
    return "-" if n is None else f"{n:.2e}"


def offline_table(agg: dict[str, Any], extra_params: dict[str, int | None]) -> str:
    """Markdown table of the offline aggregate."""
    lines = ["| method | batch | tok/s median (min-max) | vs baseline | mean accept len | "
             "accept per pos | steps w/o drafts | draft tok/step | = baseline | peak RSS MiB | "
             "extra params |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, m in agg.items():
        if m["status"] != "ok":
            continue
        for row in m["rows"]:
            bs, spec = row["batch_size"], row["spec"]
            eq = row.get("equal_to_baseline")
            lines.append(
                f"| {name} | {bs} | {_fmt_spread(row['tokens_per_s'])} | "
                f"{_fmt_spread(row['ratio'], 2, 'x')} | {_fmt(spec['mean_acceptance_length'], 2)} | "
                f"{_fmt_pos(spec['acceptance_per_pos'])} | {_policy_cols(spec)} | "
                f"{_fmt(None if eq is None else eq * 100, 0, '%')} | "
                f"{_fmt(m['peak_rss_mib'], 0)} | {_params(extra_params.get(name))} |")
    return "\n".join(lines)


def online_table(agg: dict[str, Any]) -> str:
    """Markdown table of the online aggregate."""
    lines = ["| method | conc. | tok/s median (min-max) | vs baseline | TTFT med / p90 ms | "
             "TPOT med / p90 ms | mean accept len | steps w/o drafts | draft tok/step | "
             "failed req | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in agg.items():
        if m["status"] != "ok":
            continue
        for row in m["rows"]:
            conc = row["concurrency"]
            def med(metric: str, stat: str) -> float | None:
                s = row[metric][stat]
                return s["median"] if s else None
            lines.append(
                f"| {name} | {conc} | {_fmt_spread(row['tokens_per_s'])} | "
                f"{_fmt_spread(row['ratio'], 2, 'x')} | "
                f"{_fmt(med('ttft', 'median_ms'), 0)} / {_fmt(med('ttft', 'p90_ms'), 0)} | "
                f"{_fmt(med('tpot', 'median_ms'), 1)} / {_fmt(med('tpot', 'p90_ms'), 1)} | "
                f"{_fmt(row['spec']['mean_acceptance_length'], 2)} | {_policy_cols(row['spec'])} | "
                f"{row['failed_requests']} | "
                f"{_fmt(m['peak_rss_mib'], 0)} |")
    return "\n".join(lines)


def not_run_lines(results: dict[str, Any]) -> list[str]:
    """One bullet per skipped or failed method (with the first error line)."""
    lines = []
    for m in results["methods"]:
        if m.get("skip_reason"):
            lines.append(f"- **{m['name']}**: skipped: {m['skip_reason']}")
    for mode in ("offline", "online"):
        for name, a in (results.get(mode, {}).get("aggregate") or {}).items():
            if a["status"] != "ok":
                err = (a["errors"] or ["no error text"])[0].strip().replace("\n", " / ")
                lines.append(f"- **{name}** ({mode}): failed: {err[:600]}")
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report: setup, machine, tables, skipped/failed methods."""
    meta, mach = results["meta"], results["meta"]["machine"]
    extra = {m["name"]: m.get("extra_params") for m in results["methods"]}
    out = [f"# Speculative decoding benchmark ({meta['timestamp']})", "",
           f"- command: `{meta['command']}`",
           f"- model: `{meta['model']}` dtype {meta['dtype']}, max_tokens {meta['max_tokens']}, "
           f"greedy, chat template, max_model_len {meta['max_model_len']}, "
           f"{'eager' if meta['enforce_eager'] else 'torch.compile'}",
           f"- workload: {meta['workload']} ({meta['num_prompts']} prompts, digest "
           f"{meta['prompts_digest']}), repeats {meta['repeats']} offline / "
           f"{meta.get('online_repeats', meta['repeats'])} online (method order rotated per repeat)",
           f"- machine: {mach['cpu_model']}, {mach['logical_cores']} logical cores "
           f"({mach.get('affinity_cores')} usable), {mach['ram_gib']} GiB RAM, GPU {mach.get('gpu') or 'none'}; "
           f"{mach['vllm_dist']} {mach['vllm']}, torch {mach['torch']}, "
           f"arctic-inference {mach.get('arctic_inference')}, python {mach['python']}",
           "- tok/s = output tokens / wall time of the generate calls; ratios are to the baseline "
           "of the same repeat; mean acceptance length counts the bonus token (vLLM convention); "
           "'= baseline' is the share of prompts whose greedy token ids equal the baseline's at the "
           "same batch size; peak RSS sums the engine process tree."]
    if meta.get("note"):
        out.append(f"- note: {meta['note']}")
    out.append("")
    if "offline" in results:
        engines = ("one engine per method for all batch sizes, except suffix (its response "
                   "cache would see each prompt again): a fresh engine per batch size"
                   if meta.get("shared_engine")
                   else "a fresh engine per method and batch size")
        out += ["## Offline (`vllm.LLM`, b prompts per generate call)", "",
                f"Warm-up on unrelated prompts, then timed; {engines}.", "",
                offline_table(results["offline"]["aggregate"], extra), ""]
    if "online" in results:
        out += ["## Online (`vllm serve`, streaming chat completions)", "",
                online_table(results["online"]["aggregate"]), ""]
    cores = mach.get("affinity_cores") or mach.get("logical_cores") or 0
    loads = {f"{name} ({mode})": a["max_load1"] for mode in ("offline", "online")
             for name, a in (results.get(mode, {}).get("aggregate") or {}).items()
             if a.get("max_load1") is not None}
    busy = {k: v for k, v in loads.items() if cores and v > cores + 0.5}
    if busy:
        out += ["**Warning: the machine was busy with other work during these runs** (peak "
                f"1-min load average vs {cores} cores: "
                + ", ".join(f"{k} {v:.1f}" for k, v in busy.items())
                + "); absolute tok/s and ratios are unreliable.", ""]
    missing = not_run_lines(results)
    if missing:
        out += ["## Not measured", "", *missing, ""]
    return "\n".join(out)


# ------------------------------------------------------------------ plots

def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """speedup.png (ratio vs batch size / concurrency) and acceptance.png (per position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    modes = [(m, k) for m, k in (("offline", "batch size"), ("online", "concurrency"))
             if m in results]
    if modes:
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
        for ax, (mode, label) in zip(axes[0], modes):
            key = "batch_size" if mode == "offline" else "concurrency"
            for name, a in results[mode]["aggregate"].items():
                pts = [(r[key], r["ratio"]) for r in a["rows"] if r["ratio"]]
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                med = [s["median"] for _, s in pts]
                err = [[s["median"] - s["min"] for _, s in pts], [s["max"] - s["median"] for _, s in pts]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ticks = sorted({r[key] for a in results[mode]["aggregate"].values() for r in a["rows"]})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel(label)
            ax.set_ylabel("output tok/s vs baseline")
            ax.set_title(f"{mode}: speedup")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        written.append(folder / "speedup.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for mode in ("offline", "online"):
        for name, a in (results.get(mode, {}).get("aggregate") or {}).items():
            total = SpecCounters()
            for r in a["rows"]:
                total = total + SpecCounters.from_json(r["spec"])
            rates = total.to_json()["acceptance_per_pos"]
            if rates:
                ax.plot(range(1, len(rates) + 1), rates, marker="o", label=f"{name} ({mode})")
                drawn = True
    if drawn:
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate (accepted / drafts)")
        ax.set_ylim(0, 1)
        ax.set_title("Per-position acceptance")
        ax.legend()
        fig.tight_layout()
        written.append(folder / "acceptance.png")
        fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def rerender(folder: Path) -> None:
    """Rebuild aggregates, report.md and plots from a folder's results.json."""
    import json

    results = json.loads((folder / "results.json").read_text())
    for mode in ("offline", "online"):
        if mode in results:
            results[mode]["aggregate"] = aggregate(results[mode]["runs"], mode)
    (folder / "report.md").write_text(render_markdown(results))
    plot(results, folder)


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1]))
