"""Greedy batch generation with vLLM, run as its own process.

``python -m specstream_vllm.training.generate --model DIR --input in.jsonl --output out.jsonl``

Input lines: ``{"i": int, "prompt_ids": [...]}``; output lines add ``response_ids`` and
``finish_reason``. vLLM's offline engine spawns worker processes, so the engine is
created only under the ``__main__`` guard.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def run(model: str, input_path: str, output_path: str, max_new_tokens: int, dtype: str,
        max_model_len: int, max_num_seqs: int, seed: int, enforce_eager: bool = False) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(input_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    t0 = time.time()
    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
              seed=seed, enforce_eager=enforce_eager, enable_prefix_caching=False)
    t1 = time.time()
    sp = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=seed)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in rows], sp,
                        use_tqdm=True)
    t2 = time.time()
    ntok = 0
    tmp = output_path + ".tmp"
    with open(tmp, "w") as f:
        for r, o in zip(rows, outs):
            c = o.outputs[0]
            ntok += len(c.token_ids)
            f.write(json.dumps({"i": r["i"], "response_ids": list(c.token_ids),
                                "finish_reason": c.finish_reason or ""}) + "\n")
    os.replace(tmp, output_path)
    print(f"[generate] {len(rows)} prompts, {ntok} tokens in {t2 - t1:.1f}s "
          f"({ntok / max(t2 - t1, 1e-9):.1f} tok/s); engine start {t1 - t0:.1f}s", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--enforce-eager", action="store_true")
    a = ap.parse_args(argv)
    run(a.model, a.input, a.output, a.max_new_tokens, a.dtype, a.max_model_len, a.max_num_seqs,
        a.seed, a.enforce_eager)


if __name__ == "__main__":
    main()
