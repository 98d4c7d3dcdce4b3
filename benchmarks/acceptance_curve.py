"""Acceptance against training budget: evaluate every snapshot of a training run.

For each ``snapshots/step-*`` checkpoint of a run (and any extra checkpoints given), the
exact chain acceptance on the base model's greedy answers (``specstream eval``: MT-Bench
first turns and held-out ShareGPT), next to what the snapshot had cost: steps, training
seconds, conversations and tokens seen (its ``data_manifest.json``).

    python -m benchmarks.acceptance_curve runs/smollm2-tf-next runs/smollm2-tf-paper \\
        --answers-recipe configs/train_smollm2_lossless.yaml --out docs/training/curve

The answers come from ``--answers-recipe``'s data settings, so runs with different
training data are scored on the same answers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


#: whose data settings make the scored answers: every curve and sweep uses the same ones
ANSWERS_RECIPE = "configs/train_smollm2_lossless.yaml"


def checkpoints_of(run: Path) -> list[Path]:
    snaps = sorted((run / "snapshots").glob("step-*")) if (run / "snapshots").is_dir() else []
    final = [run] if (run / "config.json").is_file() else []
    return snaps + final


def describe(ckpt: Path) -> dict:
    cfg = json.loads((ckpt / "config.json").read_text())
    man = ckpt / "data_manifest.json"
    m = json.loads(man.read_text()) if man.is_file() else {}
    tr = cfg.get("training", {})
    return {"checkpoint": str(ckpt), "stream_input": cfg.get("stream_input", "paper"),
            "steps": tr.get("steps"), "train_seconds": tr.get("train_seconds"),
            "conversations": m.get("conversations_consumed"), "tokens_seen": m.get("tokens_seen"),
            "train_acc_ema": (tr.get("last") or {}).get("acc_ema"),
            "stream_params": tr.get("stream_parameters")}


def score(ckpt: Path, sets: list[str], gamma: int, max_examples: int | None,
          answers_recipe: str) -> dict:
    """One checkpoint's row: what it cost (:func:`describe`) and its chain acceptance at
    ``gamma`` on each set, scored on the answers ``answers_recipe``'s data settings make."""
    from specstream_vllm.training.evaluate import evaluate
    from specstream_vllm.training.recipe import load_recipe

    row = describe(ckpt)
    rep = evaluate(ckpt, sets=tuple(sets), gammas=[gamma], data_spec=load_recipe(answers_recipe).data,
                   max_examples=max_examples, progress=False, log=lambda s: None)
    for name, res in rep["sets"].items():
        st = res["drafters"]["specstream"][f"gamma_{gamma}"]
        row[name] = {"mal": st["mean_acceptance_length"],
                     "per_position": st["per_position_acceptance"]}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (their snapshots/ are read) or checkpoints")
    ap.add_argument("--answers-recipe", default=ANSWERS_RECIPE)
    ap.add_argument("--sets", default="mtbench,heldout")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--every", type=int, default=1, help="evaluate every n-th snapshot")
    ap.add_argument("--max-examples", type=int, default=None, help="first n sequences of each set")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)

    rows = []
    for run in map(Path, args.runs):
        cks = checkpoints_of(run)
        cks = cks[:-1][::args.every] + cks[-1:] if cks else []
        for ck in cks:
            row = score(ck, sets=args.sets.split(","), gamma=args.gamma,
                        max_examples=args.max_examples, answers_recipe=args.answers_recipe)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        out.with_suffix(".md").write_text(to_markdown(rows, args.sets.split(","), args.gamma))
    print(to_markdown(rows, args.sets.split(","), args.gamma))
    return 0


def to_markdown(rows: list[dict], sets: list[str], gamma: int) -> str:
    head = ["form", "steps", "train min", "conversations", "tokens seen"]
    head += [f"{s} MAL (γ={gamma})" for s in sets] + [f"{sets[0]} per position", "train top-1 (EMA)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stream_input"], str(r["steps"]),
                 f"{(r['train_seconds'] or 0) / 60:.0f}", f"{r['conversations'] or '-'}",
                 f"{r['tokens_seen']:,}" if r["tokens_seen"] else "-"]
        cells += [f"{r[s]['mal']:.3f}" if s in r else "-" for s in sets]
        cells.append(" / ".join(f"{x:.2f}" for x in r[sets[0]]["per_position"]) if sets[0] in r else "-")
        cells.append(" / ".join(f"{x:.2f}" for x in r["train_acc_ema"]) if r["train_acc_ema"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
