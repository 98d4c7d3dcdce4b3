"""LoRA fine-tuning with speculative streams (the trainer's fine-tuned mode), then
serving the result with speculation.

    python examples/lora_finetuning.py            # 60 steps (several minutes on a CPU)
    python examples/lora_finetuning.py --quick    # 2 steps (what the tests run)
"""
import argparse
import tempfile
from pathlib import Path

from specstream_vllm import LoRAAdapter, SpeculativeEngine

DATA = [  # (prompt, response) pairs; chat conversations and plain strings work too
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is 2 + 2?", "2 + 2 equals 4."),
    ("What is 3 + 5?", "3 + 5 equals 8."),
    ("Name a primary color.", "Red is a primary color."),
    ("Name a large ocean.", "The Pacific Ocean is the largest ocean on Earth."),
] * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (tests)")
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="specstream-lora-example-"))

    adapter = LoRAAdapter(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], num_streams=4,
                          output_dir=str(out / "run"), seq_len=64 if args.quick else 96,
                          batch_size=2 if args.quick else 4)
    stats = adapter.get_parameter_stats()
    print(f"trainable {stats['trainable_parameters']:,} of {stats['base_parameters']:,} "
          f"({100 * stats['trainable_fraction']:.2f}%)")

    result = adapter.train(DATA, max_steps=2 if args.quick else 60, lr=5e-4, progress=not args.quick)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s, loss {result.final_loss:.3f}")

    adapter.save_weights(str(out / "adapter"))            # LoRA + stream tensors only (small)
    restored = LoRAAdapter(output_dir=str(out / "restored")).load_weights(str(out / "adapter"))
    model_dir = restored.get_adapted_model()              # merged model + specstream/ streams
    print("servable model:", model_dir)

    with SpeculativeEngine(model=str(model_dir), gamma=4, enforce_eager=True,
                           max_model_len=1024) as engine:  # streams travel with the model
        r = engine.generate("What is the capital of Spain?", max_new_tokens=12 if args.quick else 48)
        print(r.text, f"[mean acceptance length {r.mean_acceptance_length:.2f}]")


if __name__ == "__main__":  # vLLM on CPU spawns worker processes
    main()
