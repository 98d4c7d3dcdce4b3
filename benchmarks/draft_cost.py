"""What one specstream draft costs, part by part, at batch 1 (in-process engine).

Runs the engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
proposer's parts can be timed directly: attention metadata, the stream pass through
the top N_s layers, the LM head over the draft vocabulary (+ argmax), and the whole
``propose``; then the same prompts without speculation for the per-token time.

    python -m benchmarks.draft_cost [--streams DIR] [--gamma 4] [--num-prompts 3]

Complements ``benchmarks.profile_step`` (spans of the multiprocess engine: verify,
draft, sampling, scheduler).
"""
from __future__ import annotations

import collections
import json
import os
import time


def _timed(table, counts, name, fn):
    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            table[name] += time.perf_counter() - t
            counts[name] += 1
    return run


def measure(model: str, streams: str | None, gamma: int, prompts: list[str], max_tokens: int,
            dtype: str = "auto") -> dict:
    from vllm import LLM, SamplingParams

    from specstream_vllm.vllm_integration import compat
    from specstream_vllm.vllm_integration import proposer as P

    T: dict[str, float] = collections.defaultdict(float)
    N: collections.Counter = collections.Counter()
    if streams is not None:
        orig_load = P.SpecStreamProposer.load_model
        orig_propose = P.SpecStreamProposer._propose

        def load_model(self, target):
            orig_load(self, target)
            self.model.stream_forward = _timed(T, N, "stream_pass", self.model.stream_forward)
            self.model.draft_token_ids = _timed(T, N, "draft_lm_head_argmax", self.model.draft_token_ids)

        P.SpecStreamProposer.load_model = load_model
        P.SpecStreamProposer._propose = _timed(T, N, "propose", orig_propose)
        compat.build_layer_metadata = _timed(T, N, "attention_metadata", compat.build_layer_metadata)
        spec = {"method": "specstream", "model": streams, "num_speculative_tokens": gamma}
    else:
        spec = None
    from specstream_vllm.dtype_choice import resolve_dtype
    llm = LLM(model=model, dtype=resolve_dtype(dtype), max_model_len=2048, speculative_config=spec)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0)
    llm.chat([{"role": "user", "content": "Write a short story about a dragon."}], sp)  # warm-up
    T.clear()
    N.clear()
    t0, tokens = time.perf_counter(), 0
    for p in prompts:
        tokens += len(llm.chat([{"role": "user", "content": p}], sp)[0].outputs[0].token_ids)
    wall = time.perf_counter() - t0
    steps = N["propose"] or tokens
    out = {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
           "steps": steps, "ms_per_step": round(wall / steps * 1000, 3),
           "tokens_per_step": round(tokens / steps, 3)}
    out["ms_per_call"] = {k: round(T[k] / max(N[k], 1) * 1000, 3) for k in T}
    del llm
    return out


def main(argv=None) -> int:
    from .profile_step import batch1_inputs, batch1_parser
    ap = batch1_parser("python -m benchmarks.draft_cost", num_prompts=3)
    ap.add_argument("--baseline", action="store_true", help="measure vLLM without speculation instead")
    ap.add_argument("--dtype", default="auto",
                    help="auto: bfloat16 on CPUs with AMX bf16, else float32 (specstream_vllm.hardware)")
    a = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model, streams, prompts = batch1_inputs(a)
    if a.baseline:
        streams = None
    res = {"method": "baseline" if a.baseline else "specstream", "gamma": None if a.baseline else a.gamma,
           **measure(model, streams, a.gamma, prompts, a.max_tokens, a.dtype)}
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
