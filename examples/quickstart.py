"""Quickstart: the embedded SmolLM2-135M-Instruct with its shipped streams, on a CPU.

    python examples/quickstart.py            # up to 128 new tokens
    python examples/quickstart.py --quick    # 16 tokens (what the tests run)
"""
import argparse

from specstream_vllm import SpeculativeEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (tests)")
    ap.add_argument("--streams", default=None, help="stream checkpoint (default: the shipped one)")
    args = ap.parse_args()

    # model=None: the embedded default; enforce_eager skips vLLM's ~45 s compile on CPU
    with SpeculativeEngine(gamma=4, streams=args.streams, enforce_eager=True,
                           max_model_len=2048) as engine:
        result = engine.generate("What is the capital of France?",
                                 max_new_tokens=16 if args.quick else 128)
        print(result.text)
        print(f"{result.num_generated_tokens} tokens, {result.tokens_per_second:.1f} tok/s, "
              f"mean acceptance length {result.mean_acceptance_length:.2f}")


if __name__ == "__main__":  # vLLM on CPU spawns worker processes
    main()
