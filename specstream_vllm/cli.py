"""The ``specstream`` console command (argparse subcommands)."""
from __future__ import annotations

import argparse
import sys

from .errors import SpecStreamError


def build_parser() -> argparse.ArgumentParser:
    from .training.cli import (add_data_parser, add_eval_parser, add_medusa_parser,
                               add_train_parser)

    ap = argparse.ArgumentParser(prog="specstream",
                                 description="Speculative Streaming for vLLM: train and evaluate streams.")
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_data_parser(sub)
    add_eval_parser(sub)
    add_medusa_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecStreamError as e:
        print(f"specstream: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
