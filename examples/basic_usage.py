"""Basic usage: prompts, batches, chat, sampling, metrics, a benchmark against vLLM
without speculation, and the deployment command.

    python examples/basic_usage.py            # full run (a few minutes on a CPU)
    python examples/basic_usage.py --quick    # tiny run (what the tests run)
"""
import argparse

from specstream_vllm import DeploymentConfig, SpeculativeEngine, TreeDraftingNotSupportedError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run (tests)")
    ap.add_argument("--streams", default=None, help="stream checkpoint (default: the shipped one)")
    args = ap.parse_args()
    n = 12 if args.quick else 96

    # Parameters of the original SpecStream package that vLLM cannot honour fail loudly.
    try:
        SpeculativeEngine(streams=args.streams, tree_depth=3, tree_width=2)
    except TreeDraftingNotSupportedError as e:
        print("tree drafting:", str(e).split(":")[0], "-> not supported yet")

    with SpeculativeEngine(gamma=4, streams=args.streams, dtype="float32", enforce_eager=True,
                           max_model_len=2048) as engine:
        # 1. one prompt (strings get the chat template of an instruct model)
        r = engine.generate("Give me three tips for writing clean Python code.", max_new_tokens=n)
        print(r.text, f"\n[{r.tokens_per_second:.1f} tok/s, acceptance {r.mean_acceptance_length:.2f}]")

        # 2. a batch of prompts, sampled
        batch = engine.generate(["Write a haiku about autumn.", "What does HTTP stand for?"],
                                max_new_tokens=n, temperature=0.7, top_p=0.9, seed=0)
        for text in batch.texts:
            print("-", text.strip().replace("\n", " ")[:120])

        # 3. a chat conversation
        chat = engine.generate([
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Explain photosynthesis in one sentence."},
        ], max_new_tokens=n)
        print(chat.text)

        # 4. running totals from vLLM's spec-decode counters
        m = engine.get_metrics()
        print(f"drafts {m.num_drafts}, accepted {m.num_accepted_tokens}/{m.num_draft_tokens} draft tokens, "
              f"per position {m.accepted_per_position}, mean acceptance length {m.mean_acceptance_length:.2f}, "
              f"{m.total_generated_tokens} tokens in {m.total_seconds:.1f} s")

        # 5. the same prompts with and without speculation (baseline: a subprocess engine)
        prompts = ["What is the capital of France?", "Describe the water cycle in a few sentences."]
        bench = engine.benchmark(prompts[:1] if args.quick else prompts,
                                 num_runs=1 if args.quick else 3, max_new_tokens=n)
        print(bench.summary())

    # 6. the same deployment as a server command
    cfg = DeploymentConfig(streams=args.streams, gamma=4, max_model_len=2048, kv_cache_gib=1, port=8000)
    print(cfg.shell_command(launcher="auto"))


if __name__ == "__main__":  # vLLM on CPU spawns worker processes
    main()
