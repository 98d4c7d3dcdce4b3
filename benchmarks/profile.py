"""Where a decode step's wall time goes, per function, in one in-process engine.

Wraps vLLM's runner (forward, sampling, input preparation), the specstream proposer (stream
pass, match sources), the draft policy and vLLM's sampler with wall-clock counters (no
profiler: the numbers are what the step costs, the draft's parts included), runs one warm-up
and one measured ``generate`` of ``--batch`` prompts, and prints ms per step and per call,
beside the acceptance of that run.

    python -m benchmarks.profile --batch 16 [--streams DIR] [--policy fixed] [--match none]
    python -m benchmarks.profile --streams none --batch 16      # no speculation
    python -m benchmarks.profile --workload mtbench --batch 1   # chat prompts, EOS honoured
    python -m benchmarks.profile --workload code --prompts 12 --method suffix  # vLLM's own
    python -m benchmarks.profile --workload code --prompts 6 --by-tokens --pass-ops 40

``--by-tokens``: the verification forward's median by the number of tokens it ran (how much a
verified draft token costs); ``--pass-ops N``: the operations of N stream passes (PyTorch's
profiler, self time per pass), which says whether a pass waits for its weights (the GEMMs) or
for the operations around them.

Pin it to a core for A/B runs on a shared machine (``VLLM_CPU_OMP_THREADS_BIND=0 taskset -c 0``);
``OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind taskset -c 0`` gives the one thread a
served engine's worker has on a 2-core machine (vLLM keeps the other core for its engine core).
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
from collections import Counter, defaultdict

PROMPTS = ["Write a short story about a robot learning to paint.", "Explain how vaccines work.",
           "Give three tips for a job interview.", "What causes the seasons on Earth?"]
#: "module:Class": methods timed (what does not exist in this version is listed, not timed)
SPANS = {
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner": (
        "execute_model", "_model_forward", "sample_tokens", "_sample", "_prepare_inputs",
        "_bookkeeping_sync", "_update_states"),
    "vllm.v1.sample.sampler:Sampler": ("sample",),
    "specstream_vllm.vllm_integration.proposer:SpecStreamProposer": (
        "_propose", "_stream_pass", "_run_streams", "_observe", "_candidates"),
    "specstream_vllm.policy.policy:DraftPolicy": (
        "plan", "decide", "continue_chain", "observe_step", "observe_acceptance", "expected"),
    "specstream_vllm.vllm_integration.match_source:SuffixMatch": ("sync", "propose"),
    "specstream_vllm.vllm_integration.match_source:NgramMatch": ("sync", "propose"),
}


class Spans:
    """Wall-clock totals, call counts and worst call per wrapped method."""

    def __init__(self):
        self.total, self.calls, self.worst = defaultdict(float), defaultdict(int), defaultdict(float)
        self.missing: list[str] = []

    def wrap(self, owner, name: str) -> None:
        fn = getattr(owner, name, None)
        label = f"{owner.__name__}.{name}"
        if fn is None:
            self.missing.append(label)
            return

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

    def wrap_all(self, table: dict[str, tuple[str, ...]]) -> None:
        for target, names in table.items():
            module, _, cls = target.partition(":")
            try:
                owner = getattr(importlib.import_module(module), cls)
            except (ImportError, AttributeError):
                self.missing.append(target)
                continue
            for name in names:
                self.wrap(owner, name)

    def clear(self) -> None:
        for d in (self.total, self.calls, self.worst):
            d.clear()

    def report(self, steps: int) -> str:
        rows = [f"{'span':48s} {'ms/step':>8s} {'calls':>6s} {'ms/call':>8s} {'max ms':>7s}"]
        for k in sorted(self.total, key=lambda k: -self.total[k]):
            rows.append(f"{k:48s} {1000 * self.total[k] / steps:8.2f} {self.calls[k]:6d} "
                        f"{1000 * self.total[k] / self.calls[k]:8.3f} {1000 * self.worst[k]:7.1f}")
        if self.missing:
            rows.append("not in this version (not timed): " + ", ".join(self.missing))
        return "\n".join(rows)


class ForwardByTokens:
    """The runner's model forward timed per number of tokens it ran."""

    def __init__(self):
        self.seconds: dict[int, list[float]] = defaultdict(list)
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        fn = GPUModelRunner._model_forward

        def timed(runner, input_ids=None, positions=None, *args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(runner, input_ids, positions, *args, **kwargs)
            finally:
                n = positions.shape[-1] if positions is not None else input_ids.shape[-1]
                self.seconds[int(n)].append(time.perf_counter() - t)
        GPUModelRunner._model_forward = timed

    def report(self, up_to: int = 17) -> str:
        rows = [f"{'tokens':>6s} {'steps':>6s} {'median ms':>9s}"]
        for n in sorted(k for k in self.seconds if k <= up_to):
            v = sorted(self.seconds[n])
            rows.append(f"{n:6d} {len(v):6d} {1000 * v[len(v) // 2]:9.2f}")
        return "\n".join(rows)


class PassOps:
    """PyTorch's profiler around ``passes`` stream passes (after ``skip`` of them)."""

    def __init__(self, passes: int, skip: int = 10):
        import torch

        from specstream_vllm.vllm_integration.proposer import SpecStreamProposer
        self.passes, self.skip, self.seen = passes, skip, 0
        self.self_us, self.calls = Counter(), Counter()
        fn = SpecStreamProposer._run_streams

        def profiled(proposer, *args, **kwargs):
            self.seen += 1
            if not self.skip < self.seen <= self.skip + self.passes:
                return fn(proposer, *args, **kwargs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = fn(proposer, *args, **kwargs)
            for e in prof.key_averages():
                self.self_us[e.key] += e.self_cpu_time_total
                self.calls[e.key] += e.count
            return out
        SpecStreamProposer._run_streams = profiled

    def report(self, top: int = 20) -> str:
        n = min(max(self.seen - self.skip, 0), self.passes)
        if n == 0:
            return "no stream pass was profiled (none ran after the first ones)"
        rows = [f"{n} stream passes, {sum(self.self_us.values()) / n / 1000:.2f} ms of "
                "operations each (profiler overhead included)",
                f"{'operation':60s} {'us/pass':>8s} {'calls/pass':>10s}"]
        for key, us in self.self_us.most_common(top):
            rows.append(f"{key[:60]:60s} {us / n:8.1f} {self.calls[key] / n:10.1f}")
        return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--streams", default=None, help="stream checkpoint, or 'none' (default: shipped)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--policy", default="auto", choices=["auto", "fixed"])
    ap.add_argument("--match", default="none")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--gamma", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--workload", help="mtbench / sharegpt / code: chat prompts of that workload "
                    "(prefill included, EOS honoured) instead of the built-in ones")
    ap.add_argument("--prompts", type=int, default=None,
                    help="with --workload: time this many prompts, --batch at a time (default: one batch)")
    ap.add_argument("--method", default="specstream", choices=["specstream", "suffix", "ngram"],
                    help="suffix / ngram: vLLM's own method with --gamma tokens, for comparison")
    ap.add_argument("--by-tokens", action="store_true",
                    help="also the model forward's median per number of tokens it ran")
    ap.add_argument("--pass-ops", type=int, default=0, metavar="N",
                    help="also the operations of N stream passes (PyTorch's profiler)")
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # runner and proposer in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["SPECSTREAM_DRAFT_POLICY"] = args.policy

    from vllm import LLM, SamplingParams

    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    from specstream_vllm.spec_counters import read

    spans = Spans()
    spans.wrap_all(SPANS)
    by_tokens = ForwardByTokens() if args.by_tokens else None
    streams = args.streams or str(shipped_streams_dir())
    spec = None if streams == "none" else {"method": "specstream", "model": streams,
                                           "num_speculative_tokens": args.gamma, "match": args.match}
    if args.method != "specstream":
        streams = args.method
        spec = {"method": args.method, "num_speculative_tokens": args.gamma}
        if args.method == "ngram":
            spec.update(prompt_lookup_min=2, prompt_lookup_max=4)
    llm = LLM(model=args.model or str(default_model_dir()), dtype=args.dtype,
              enforce_eager=args.enforce_eager, max_model_len=1024, seed=0, disable_log_stats=False,
              speculative_config=spec, max_num_seqs=max(32, args.batch))
    if args.workload:
        from .workloads import load_workload
        convs = [[dict(m) for m in p.messages] for p in load_workload(args.workload)
                 if len(p.messages[-1]["content"]) < 2000]
        sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        n = args.prompts or args.batch
        warm, timed = convs[-args.batch:], convs[:n]

        def run(cs):
            return [o for i in range(0, len(cs), args.batch)
                    for o in llm.chat(cs[i:i + args.batch], sp, use_tqdm=False)]
    else:
        sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        warm = timed = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
        run = lambda p: llm.generate(p, sp, use_tqdm=False)  # noqa: E731
    run(warm)  # warm-up: compilation, the policy's first fit
    spans.clear()
    if by_tokens is not None:
        by_tokens.seconds.clear()
    pass_ops = PassOps(args.pass_ops) if args.pass_ops else None
    before = read(llm)
    t = time.perf_counter()
    outs = run(timed)
    dt = time.perf_counter() - t
    acc = read(llm) - before
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = spans.calls.get("GPUModelRunner.execute_model", 1)
    print(f"streams={streams} batch={args.batch} prompts={len(timed)} policy={args.policy} match={args.match}: "
          f"{n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s, {steps} steps, mean acceptance length "
          f"{acc.mean_acceptance_length:.2f}")
    print(spans.report(steps))
    if by_tokens is not None:
        print(by_tokens.report())
    if pass_ops is not None:
        print(pass_ops.report())
        print("(tok/s and the spans that hold the profiled passes include the profiler's own "
              "time: take timings from a run without --pass-ops)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
