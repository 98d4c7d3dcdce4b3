"""Where a decode step's wall time goes, per function, in one in-process engine.

Wraps the runner's forward / sampling / drafting, the specstream proposer's and draft
policy's methods and vLLM's sampler with wall-clock counters (no profiler: the numbers are
what the step costs), runs one warm-up and one measured ``generate`` of ``--batch`` prompts
(greedy, ``--max-tokens`` each, EOS ignored) and prints ms per step and per call.

    python -m benchmarks.step_spans --streams DIR --batch 16 [--policy auto] [--match none]
    python -m benchmarks.step_spans --streams none --batch 16      # no speculation

Pin it to a core for A/B runs on a shared machine (``VLLM_CPU_OMP_THREADS_BIND=0 taskset -c 0``).
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how vaccines work.",
           "Give three tips for a job interview.", "What causes the seasons on Earth?"]


class Spans:
    def __init__(self):
        self.total, self.calls, self.worst = defaultdict(float), defaultdict(int), defaultdict(float)

    def wrap(self, owner, name: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return
        label = f"{owner.__name__}.{name}"

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                e = time.perf_counter() - t
                self.total[label] += e
                self.calls[label] += 1
                self.worst[label] = max(self.worst[label], e)
        setattr(owner, name, timed)

    def clear(self) -> None:
        for d in (self.total, self.calls, self.worst):
            d.clear()

    def report(self, steps: int) -> str:
        rows = [f"{'span':48s} {'ms/step':>8s} {'calls':>6s} {'ms/call':>8s} {'max ms':>7s}"]
        for k in sorted(self.total, key=lambda k: -self.total[k]):
            rows.append(f"{k:48s} {1000 * self.total[k] / steps:8.2f} {self.calls[k]:6d} "
                        f"{1000 * self.total[k] / self.calls[k]:8.3f} {1000 * self.worst[k]:7.1f}")
        return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default=None, help="stream checkpoint, or 'none' (default: shipped)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--policy", default="auto", choices=["auto", "fixed"])
    ap.add_argument("--match", default="none")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--workload", help="mtbench / sharegpt / code: chat prompts of that workload "
                    "(prefill included, EOS honoured) instead of the built-in ones")
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # runner and proposer in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SPECSTREAM_DRAFT_POLICY"] = args.policy
    if args.policy == "fixed":
        os.environ.setdefault("SPECSTREAM_MIN_DRAFT_PROB", "0")

    from specstream_vllm.model_patches import msa, stream_layers
    from specstream_vllm.vllm_integration import draft_policy, match_source, proposer
    from vllm import LLM, SamplingParams
    from vllm.v1.sample import sampler
    from vllm.v1.worker import gpu_model_runner

    spans = Spans()
    for name in ("execute_model", "_model_forward", "sample_tokens", "_sample", "_prepare_inputs",
                 "_bookkeeping_sync", "_update_states"):
        spans.wrap(gpu_model_runner.GPUModelRunner, name)
    for name in ("_propose", "_stream_pass", "_run_streams", "_observe", "_candidates"):
        spans.wrap(proposer.SpecStreamProposer, name)
    for name in ("plan", "decide", "continue_chain", "observe_step", "observe_acceptance",
                 "expected"):
        spans.wrap(draft_policy.DraftPolicy, name)
    for cls in (match_source.SuffixMatch, match_source.NgramMatch):
        for name in ("sync", "propose"):
            spans.wrap(cls, name)
    spans.wrap(stream_layers.StreamModel, "stream_forward")
    spans.wrap(msa.MSAMixin, "draft_token_ids")
    spans.wrap(msa.MSAMixin, "stream_inputs")
    spans.wrap(sampler.Sampler, "sample")

    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    streams = args.streams or str(shipped_streams_dir())
    spec = None if streams == "none" else {"method": "specstream", "model": streams,
                                           "num_speculative_tokens": args.gamma, "match": args.match}
    llm = LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=args.enforce_eager,
              max_model_len=1024, seed=0, speculative_config=spec, max_num_seqs=max(32, args.batch))
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    if args.workload:
        from .workloads import load_workload
        convs = [[dict(m) for m in p.messages] for p in load_workload(args.workload, None, None)
                 if len(p.messages[-1]["content"]) < 2000]
        sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        warm, timed = convs[-args.batch:], convs[:args.batch]
        run = lambda c: llm.chat(c, sp, use_tqdm=False)  # noqa: E731
    else:
        warm = timed = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
        run = lambda p: llm.generate(p, sp, use_tqdm=False)  # noqa: E731
    run(warm)  # warm-up: compilation, the policy's first fit
    spans.clear()
    t = time.perf_counter()
    outs = run(timed)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = spans.calls.get("GPUModelRunner.execute_model", 1)
    print(f"streams={streams} batch={args.batch} policy={args.policy} match={args.match}: "
          f"{n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s, {steps} steps")
    print(spans.report(steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
