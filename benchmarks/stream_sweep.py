"""What matters at this scale: stream variants trained for the same CPU time, then scored.

Each variant is the recipe with a few ``--set`` overrides, trained on the same
conversation stream (from scratch, or continuing one checkpoint when the variants set
``init_from``) for ``--minutes`` of training-loop time (``time_budget_minutes``:
equal CPU time, not equal steps, because that is the budget a user has), then scored by
``benchmarks.acceptance_curve`` (exact chain acceptance on the base model's greedy MT-Bench
answers). Variants run one after another: run nothing else on the machine meanwhile, or
the time budget buys fewer steps for whichever variant shared it.

    python -m benchmarks.stream_sweep --minutes 15 --out docs/training/sweep \\
        --variant base= --variant layers8=num_stream_layers=8 \\
        --variant anchors256=anchors_per_seq=256 --variant rank32=lora.rank=32

``--variant NAME=K=V[,K=V...]`` (``NAME=`` alone: the recipe unchanged). Runs go to
``runs/sweep/NAME``; a finished run is not retrained (delete it to redo it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=K=V[,K=V...]")
    return name, [s for s in sets.split(",") if s]


def train(recipe: str, name: str, sets: list[str], minutes: float, root: Path) -> Path:
    out = root / name
    if (out / "config.json").is_file():
        print(f"[sweep] {name}: already trained ({out}), kept", flush=True)
        return out
    cmd = [sys.executable, "-m", "specstream_vllm.cli", "train", "--recipe", recipe, "-o", str(out),
           "--no-progress", "--set", f"time_budget_minutes={minutes}"]
    for s in sets:
        cmd += ["--set", s]
    out.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {name}: {' '.join(cmd[3:])}", flush=True)
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/train_smollm2_tf_next_token.yaml")
    ap.add_argument("--variant", action="append", type=parse_variant, required=True)
    ap.add_argument("--minutes", type=float, default=15.0, help="training-loop minutes per variant")
    ap.add_argument("--root", default="runs/sweep")
    ap.add_argument("--max-examples", type=int, default=24, help="MT-Bench first turns scored")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)

    from benchmarks import acceptance_curve

    root = Path(args.root)
    rows = []
    for name, sets in args.variant:
        run = train(args.recipe, name, sets, args.minutes, root)
        row = acceptance_curve.score(run, sets=["mtbench"], gamma=4,
                                     max_examples=args.max_examples,
                                     answers_recipe=acceptance_curve.ANSWERS_RECIPE)
        row.update(variant=name, overrides=sets)
        rows.append(row)
        print(json.dumps(row), flush=True)
    md = to_markdown(rows, args.minutes)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def to_markdown(rows: list[dict], minutes: float) -> str:
    lines = [f"Every variant trained {minutes:g} min (training loop) on the same conversations; "
             "MT-Bench MAL = chain acceptance at γ=4 on the base model's greedy "
             "answers.", "",
             "| variant | overrides | stream params | steps | tokens seen | MT-Bench MAL | per position "
             "| train top-1 (EMA) |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        m = r["mtbench"]
        lines.append("| " + " | ".join([
            r["variant"], ", ".join(r["overrides"]) or "(recipe)", f"{r['stream_params']:,}" if r["stream_params"] else "-",
            str(r["steps"]), f"{r['tokens_seen']:,}" if r["tokens_seen"] else "-", f"{m['mal']:.3f}",
            " / ".join(f"{x:.2f}" for x in m["per_position"]),
            " / ".join(f"{x:.2f}" for x in r["train_acc_ema"]) if r["train_acc_ema"] else "-"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
