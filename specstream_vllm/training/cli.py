"""argparse subcommands of the ``specstream`` command: ``train``, ``data``, ``eval``, ``medusa``.

Each ``add_*_parser(subparsers)`` registers a subcommand whose handler is stored as
``func`` in the parsed namespace (``args.func(args)`` runs it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _overrides(args) -> dict:
    out = {}
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            import yaml
            out[k] = yaml.safe_load(v)
        except Exception:
            out[k] = v
    for attr, key in (("base_model", "base_model"), ("output_dir", "output_dir"), ("device", "device")):
        if getattr(args, attr, None):
            out[key] = getattr(args, attr)
    return out


def _recipe(args):
    from .recipe import load_recipe
    return load_recipe(args.recipe, _overrides(args))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", default=None,
                   help="recipe YAML/JSON (see configs/); defaults are used for missing fields")
    p.add_argument("--base-model", default=None, help='local HF model dir or "default" (SmolLM2-135M)')
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set data.num_train_prompts=200 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- train

def _run_train(args) -> int:
    from .trainer import train
    recipe = _recipe(args)
    res = train(recipe, resume=args.resume, progress=not args.no_progress)
    from .parallel import Ranks
    if not Ranks.from_env().is_main:
        return 0
    print(f"stream checkpoint: {res.checkpoint_dir} ({res.stream_params:,} parameters, "
          f"{res.steps} steps, {res.seconds / 60:.1f} min)")
    if args.eval:
        from .evaluate import evaluate, summarize
        report = evaluate(res.checkpoint_dir, gammas=recipe.eval_gammas, data_spec=recipe.data,
                          output=Path(recipe.output_dir) / "eval_report.json",
                          progress=not args.no_progress)
        print(summarize(report))
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train stream embeddings (+ LoRA) for a base model",
                              description="Self-distil responses with vLLM (cached), then train "
                                          "Speculative Streaming streams per the recipe.")
    _common(p)
    p.add_argument("--output-dir", "-o", default=None, help="where the checkpoint goes")
    p.add_argument("--device", default=None,
                   help="auto (CUDA when available), cpu, cuda or cuda:N (default: the recipe's, "
                        "auto); for several GPUs start this command with torchrun")
    p.add_argument("--resume", action="store_true", help="continue from output_dir/trainer_state.pt")
    p.add_argument("--eval", action="store_true", help="evaluate acceptance after training")
    p.set_defaults(func=_run_train)
    return p


# --------------------------------------------------------------------------- data

def _run_data(args) -> int:
    from .data import build_sets
    recipe = _recipe(args)
    sets = build_sets(recipe.resolve_base_model(), recipe.data, args.sets.split(","))
    print(json.dumps({k: len(v) for k, v in sets.items()}))
    return 0


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="generate (or reuse) the self-distilled data sets")
    _common(p)
    p.add_argument("--sets", default="train,heldout,mtbench")
    p.set_defaults(func=_run_data)
    return p


# --------------------------------------------------------------------------- eval

def _run_eval(args) -> int:
    from .evaluate import evaluate, summarize
    spec = _recipe(args).data if args.recipe or args.set else None
    gammas = [int(x) for x in args.gammas.split(",")] if args.gammas else None
    report = evaluate(args.checkpoint, base_dir=args.base_model if args.base_model not in (None, "default") else None,
                      sets=tuple(args.sets.split(",")), gammas=gammas, data_spec=spec,
                      max_examples=args.max_examples, dtype=args.dtype, medusa_dir=args.medusa,
                      output=args.output, progress=not args.no_progress,
                      include_streams=not args.no_streams)
    print(summarize(report))
    if args.output:
        print(f"report: {args.output}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="measure acceptance of a stream checkpoint",
                              description="Per-position acceptance and mean acceptance length "
                                          "(vLLM definition, bonus token included) on greedy answers.")
    _common(p)
    p.add_argument("--checkpoint", "-c", required=True)
    p.add_argument("--sets", default="mtbench,heldout", help="comma list of mtbench, heldout")
    p.add_argument("--gammas", default=None, help="comma list, default 1..num_streams")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--medusa", default=None, help="also evaluate Medusa heads from this directory")
    p.add_argument("--no-streams", action="store_true",
                   help="with --medusa: evaluate only the Medusa heads (the checkpoint still "
                        "names the base model and data settings)")
    p.add_argument("--output", "-o", default=None, help="write the JSON report here")
    p.set_defaults(func=_run_eval)
    return p


# --------------------------------------------------------------------------- medusa

def _run_medusa(args) -> int:
    from .medusa import train_medusa
    recipe = _recipe(args)
    out = args.output_dir or str(Path(recipe.output_dir) / "medusa")
    train_medusa(recipe, output_dir=out, num_heads=args.num_heads, progress=not args.no_progress)
    return 0


def add_medusa_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("medusa", help="train a Medusa-heads baseline (vLLM `medusa` format)")
    _common(p)
    p.add_argument("--output-dir", "-o", default=None)
    p.add_argument("--num-heads", type=int, default=None, help="default: the recipe's num_streams")
    p.set_defaults(func=_run_medusa)
    return p


def add_all(subparsers) -> None:
    add_train_parser(subparsers)
    add_data_parser(subparsers)
    add_eval_parser(subparsers)
    add_medusa_parser(subparsers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="specstream-train")
    sub = ap.add_subparsers(dest="command", required=True)
    add_all(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
