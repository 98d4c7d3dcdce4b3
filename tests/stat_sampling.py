"""Sampled-distribution equality of speculative decoding, measured in real engines.

Speculative decoding is lossless only if every sampled continuation is distributed as
without speculation. This module draws many short continuations of a few prompts from one
engine per method (none, specstream, ngram), compares the token at every position with a
two-sample chi-square test, and, in the specstream engine, plants a wrong acceptance rule
(every draft accepted) to show the test catches it. ``tests/test_sampling_equality.py``
runs it small; the larger version is a command:

    python -m tests.stat_sampling --samples 5000 --out /tmp/stat
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

PROMPTS = [  # raw text (no chat template): one repetitive (drafts often right), one open
    "one two three four five six seven one two three four five six seven one two three",
    "The old lighthouse keeper looked out at the sea and",
]
SETTINGS = {"t1": {"temperature": 1.0},
            "topk_topp": {"temperature": 0.8, "top_k": 20, "top_p": 0.9}}
MIN_CELL = 10      # tokens seen fewer times (both samples together) are pooled into one cell


# -- statistics ------------------------------------------------------------------------

def chi2_sf(x: float, df: int) -> float:
    """P(chi2_df > x) (torch's regularized upper incomplete gamma; no scipy here)."""
    import torch
    if df <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def chi2_isf(alpha: float, df: int) -> float:
    """The x with P(chi2_df > x) = alpha (bisection)."""
    lo, hi = 0.0, 10.0 * df + 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return hi


def two_sample_chi2(a: list[int], b: list[int]) -> tuple[float, int, float]:
    """Chi-square test that two samples of tokens share one distribution: (statistic,
    degrees of freedom, p-value). Tokens seen fewer than ``MIN_CELL`` times in both samples
    together are pooled into one cell (dropped if that cell is still too small)."""
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    cells, rare = [], [0, 0]
    for t in set(ca) | set(cb):
        if ca[t] + cb[t] >= MIN_CELL:
            cells.append((ca[t], cb[t]))
        else:
            rare[0] += ca[t]
            rare[1] += cb[t]
    if sum(rare) >= MIN_CELL:
        cells.append(tuple(rare))
    if len(cells) < 2:
        return 0.0, 0, 1.0
    ka, kb = math.sqrt(nb / na), math.sqrt(na / nb)
    stat = sum((x * ka - y * kb) ** 2 / (x + y) for x, y in cells)
    df = len(cells) - 1
    return stat, df, chi2_sf(stat, df)


def power(p: Counter, q: Counter, n: int, alpha: float) -> float:
    """Power of the test at ``n`` samples per side against the difference between
    distributions p and q (counts): noncentral chi-square, Patnaik's approximation."""
    tp, tq = sum(p.values()), sum(q.values())
    keys = set(p) | set(q)
    lam, df = 0.0, max(len(keys) - 1, 1)
    for k in keys:
        pk, qk = p[k] / tp, q[k] / tq
        if pk + qk > 0:
            lam += (pk - qk) ** 2 / ((pk + qk) / 2)
    lam *= n / 2           # n_a n_b / (n_a + n_b) with n_a = n_b = n
    crit = chi2_isf(alpha, df)
    c, h = (df + 2 * lam) / (df + lam), (df + lam) ** 2 / (df + 2 * lam)
    return chi2_sf(crit / c, max(int(round(h)), 1))


def compare(base: dict, other: dict, alpha_family: float) -> dict:
    """Position-by-position tests of ``other`` against ``base`` (both: setting -> prompt
    -> list of token lists); Bonferroni over every position, prompt and setting."""
    tests = []
    for s in base:
        for i, (xa, xb) in enumerate(zip(base[s], other[s])):
            for pos in range(min(len(xa[0]), len(xb[0]))):
                stat, df, p = two_sample_chi2([x[pos] for x in xa], [x[pos] for x in xb])
                tests.append({"setting": s, "prompt": i, "pos": pos, "stat": round(stat, 2),
                              "df": df, "p": p})
    per_test = alpha_family / max(len(tests), 1)
    return {"alpha_family": alpha_family, "alpha_per_test": per_test, "tests": tests,
            "min_p": min(t["p"] for t in tests),
            "rejected": [t for t in tests if t["p"] < per_test]}


# -- engine side -------------------------------------------------------------------------

def plant_accept_all() -> None:
    """The planted wrong rule: every draft token is accepted (then the bonus token)."""
    from vllm.v1.sample import rejection_sampler as rs
    original = rs.rejection_sample

    def accept_all(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                   draft_probs, target_logits, bonus_token_ids, sampling_metadata, *a, **kw):
        out = original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                       draft_probs, target_logits, bonus_token_ids, sampling_metadata, *a, **kw)
        start = 0
        for b, n in enumerate(num_draft_tokens):
            out[b, :n] = draft_token_ids[start:start + n]
            out[b, n] = bonus_token_ids[b, 0]
            start += n
        return out

    rs.rejection_sample = accept_all


def sample(llm, tok, samples: int, new_tokens: int) -> dict:
    """setting -> prompt -> ``samples`` continuations, all in one batch of requests."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    cells = [(name, i) for name in SETTINGS for i in range(len(PROMPTS))]
    prompts, params = [], []
    for name, i in cells:
        prompts += [TokensPrompt(prompt_token_ids=tok(PROMPTS[i]).input_ids)] * samples
        params += [SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                                  **SETTINGS[name])] * samples
    res = llm.generate(prompts, params, use_tqdm=False)
    out: dict = {name: [[] for _ in PROMPTS] for name in SETTINGS}
    for j, r in enumerate(res):
        name, i = cells[j // samples]
        out[name][i].append(list(r.outputs[0].token_ids))
    return out


def spec_counts(llm) -> dict:
    """The engine's spec-decode counters (drafts, draft_tokens, accepted_tokens, ...)."""
    from specstream_vllm.spec_counters import read
    return read(llm).to_json()


def run_job(job: dict) -> dict:
    """One engine (in this process): its samples, then (``plant``) the planted rule's."""
    from vllm import LLM
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, max_model_len=256,
              seed=job["seed"], speculative_config=job.get("spec"), max_num_seqs=job["batch"],
              disable_log_stats=False,
              max_num_batched_tokens=max(2048, job["batch"] * 8))
    tok = llm.get_tokenizer()
    t0 = time.perf_counter()
    res = {"samples": sample(llm, tok, job["samples"], job["new_tokens"])}
    res["seconds"] = time.perf_counter() - t0
    if job.get("spec"):
        res["spec_decode"] = spec_counts(llm)
    if job.get("plant"):
        plant_accept_all()
        res["planted"] = sample(llm, tok, job["plant_samples"], job["new_tokens"])
    return res


def run_engine(job: dict, workdir: Path, name: str, timeout: float = 1800,
               module: str = "tests.stat_sampling") -> dict:
    """``module.run_job(job)`` as an engine job (:mod:`specstream_vllm.engine_job`), its engine
    core in the child's own process (so a planted patch reaches it); raises with the log's tail
    when it fails. A finished job's results are reused when the job is unchanged."""
    from specstream_vllm.engine_job import run_in_subprocess
    root = str(Path(__file__).resolve().parents[1])
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           **job.get("env", {})}
    full = dict(job, call=f"{module}:run_job", env=env)
    jp, op = workdir / f"{name}.job.json", workdir / f"{name}.out.json"
    if op.exists() and jp.exists() and json.loads(jp.read_text()) == full:
        return json.loads(op.read_text())       # this job's results from an earlier run
    path = os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)
    return run_in_subprocess(full, workdir, name, timeout, env={"PYTHONPATH": path})


def jobs(model: str, streams: str, samples: int, new_tokens: int) -> dict[str, dict]:
    common = {"model": model, "samples": samples, "new_tokens": new_tokens, "batch": 256}
    return {
        "base": dict(common, seed=1),
        # every stream drafts every step (fixed policy, no confidence cut): the most drafts
        # the planted rule's effect is large: half the samples show it
        "specstream": dict(common, seed=2, plant=True, plant_samples=max(samples // 2, 50),
                           spec={"method": "specstream", "model": streams,
                                 "num_speculative_tokens": 4, "draft_policy": "fixed"},
                           env={"SPECSTREAM_MIN_DRAFT_PROB": "0"}),
        "ngram": dict(common, seed=3, spec={"method": "ngram", "num_speculative_tokens": 4,
                                            "prompt_lookup_min": 1, "prompt_lookup_max": 3}),
    }


def run_all(model: str, streams: str, samples: int, new_tokens: int, workdir: Path,
            alpha: float) -> dict:
    runs = {name: run_engine(job, workdir, name)
            for name, job in jobs(model, streams, samples, new_tokens).items()}
    base = runs["base"]["samples"]
    report = {"samples": samples, "new_tokens": new_tokens, "alpha_family": alpha,
              "seconds": {k: round(v["seconds"], 1) for k, v in runs.items()}}
    for name in ("specstream", "ngram"):
        report[name] = compare(base, runs[name]["samples"], alpha)
        report[name]["spec_decode"] = runs[name]["spec_decode"]
    planted = runs["specstream"]["planted"]
    report["planted"] = compare(base, planted, alpha)
    # power against the planted rule (equal samples per side, the planted run's count):
    # the best position decides
    per_test = report["planted"]["alpha_per_test"]
    n = len(planted[next(iter(planted))][0])
    report["planted_power"] = max(
        power(Counter(x[p] for x in xa), Counter(x[p] for x in xb), n, per_test)
        for s in base for xa, xb in zip(base[s], planted[s]) for p in range(new_tokens))
    return report


def summary(report: dict) -> str:
    lines = [f"{report['samples']} samples x {len(PROMPTS)} prompts x {len(SETTINGS)} settings, "
             f"{report['new_tokens']} tokens; family-wise false-alarm rate {report['alpha_family']}"]
    for name in ("specstream", "ngram", "planted"):
        r = report[name]
        sd = r.get("spec_decode", {})
        acc = (f", drafts {sd.get('drafts')}, accepted {sd.get('accepted_tokens')}/"
               f"{sd.get('draft_tokens')} tokens" if sd else "")
        lines.append(f"{name}: min p {r['min_p']:.3g} (threshold {r['alpha_per_test']:.2g}), "
                     f"{len(r['rejected'])} of {len(r['tests'])} positions rejected{acc}")
    lines.append(f"power against the planted rule (noncentral chi-square): {report['planted_power']:.4f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=5000, help="continuations per prompt and setting")
    ap.add_argument("--new-tokens", type=int, default=5)
    ap.add_argument("--alpha", type=float, default=1e-3, help="family-wise false-alarm rate")
    ap.add_argument("--out", type=Path, default=Path("stat_sampling_out"))
    args = ap.parse_args()
    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.default_model import default_model_dir
    streams = shipped_streams_dir()
    if streams is None:
        raise SystemExit("no shipped stream checkpoint found; install the package's assets")
    report = run_all(str(default_model_dir()), str(streams), args.samples, args.new_tokens,
                     args.out, args.alpha)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(summary(report))


if __name__ == "__main__":
    main()
