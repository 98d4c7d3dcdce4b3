"""The ``specstream`` method inside real vLLM engines (no mocks).

Every engine runs in its own process (tests/engine_job.py); each module-scoped
fixture starts one engine, so the whole file costs a handful of engine starts.
The tests of the streams themselves pin ``"match": "none"`` (the default match source
drafts from the text beside them: tests/test_match_source.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from specstream_vllm.checkpoint import LoraSpec
from specstream_vllm.reference.init import init_checkpoint
from tests.conftest import make_tiny_llama
from tests.stress.storm_plan import PROMPTS as CHAT_PROMPTS

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]

PROMPTS = CHAT_PROMPTS[:8]   # the stress test's chat questions, the first eight
MAX_TOKENS = [48, 20, 64, 33, 40, 17, 56, 25]


def run_engine(job: dict, tmp: Path, name: str) -> dict:
    """One engine job in a fresh interpreter, its engine core in that process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0): one vLLM import instead of two, ~20 s less per
    engine here. The multiprocess engine core users get by default is what the serve,
    storm, example and default-configuration tests run."""
    from specstream_vllm.engine_job import run_in_subprocess
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **job.get("env", {})}
    return run_in_subprocess(dict(job, env=env), tmp, name, timeout=900)


def outputs(result) -> dict[int, list[int]]:
    return {i: o for b in result["batches"] for i, o in zip(b["indices"], b["outputs"])}


def draft_match_rate(model, streams, log: Path, gamma: int, max_rows: int = 40) -> float:
    """Share of vLLM's logged draft tokens that the reference model drafts for the same
    context (and, for next-token-aware streams, the same token sampled at the anchor)."""
    from specstream_vllm.checkpoint import load_checkpoint
    from specstream_vllm.reference.decoder import draft_tokens
    from specstream_vllm.reference.streams import StreamParams
    cfg, tensors = load_checkpoint(streams)
    params = StreamParams.from_checkpoint(model.config, cfg, tensors)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(rows) > 10
    rows = rows[:: max(1, len(rows) // max_rows)]  # a spread of contexts, bounded cost
    same = total = 0
    for r in rows:  # the draft policy may run fewer streams than gamma: compare those
        ctx = r["context"]
        ref = draft_tokens(model, params, torch.tensor([ctx]), len(ctx) - 1, gamma,
                           next_token=r["next_token"]).tolist()
        same += sum(a == b for a, b in zip(ref, r["drafts"]))
        total += min(gamma, len(r["drafts"]))
    return same / total


def streams_for_smollm2(smollm2_dir, shipped_streams, tmp: Path) -> Path:
    if shipped_streams is not None:
        return shipped_streams
    return init_checkpoint(smollm2_dir, tmp / "untrained", num_streams=4, num_stream_layers=4,
                           lora=LoraSpec(rank=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
                           random_lora_b=True)


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_dir, shipped_streams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smol")
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp)
    batches = [[i] for i in range(len(PROMPTS))] + [list(range(len(PROMPTS)))]
    base_job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
                "batches": batches}
    base = run_engine(base_job, tmp, "base")
    log = tmp / "drafts.jsonl"
    spec_job = dict(base_job, spec={"method": "specstream", "model": str(streams),
                                    "num_speculative_tokens": 4, "match": "none"},
                    env={"SPECSTREAM_DRAFT_LOG": str(log), "SPECSTREAM_DRAFT_PRECISION": "exact", "SPECSTREAM_DRAFT_POLICY": "fixed",
                         "SPECSTREAM_MIN_DRAFT_PROB": "0"})  # every stream drafts (full chains)
    spec = run_engine(spec_job, tmp, "spec")
    return base, spec, streams, log


def test_greedy_float32_token_identical_batch1(smollm2_runs):
    base, spec, _, _ = smollm2_runs
    for b0, b1 in zip(base["batches"][:-1], spec["batches"][:-1]):
        assert b0["outputs"] == b1["outputs"], f"prompt {b0['indices']} differs"


def test_greedy_float32_token_identical_batch8_mixed_lengths(smollm2_runs):
    base, spec, _, _ = smollm2_runs
    assert base["batches"][-1]["outputs"] == spec["batches"][-1]["outputs"]
    assert all(0 < len(o) <= n for o, n in zip(spec["batches"][-1]["outputs"], MAX_TOKENS))


def test_spec_decode_metrics_filled(smollm2_runs):
    _, spec, _, _ = smollm2_runs
    m = spec["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    assert m["vllm:spec_decode_num_draft_tokens"] == 4 * m["vllm:spec_decode_num_drafts"]
    assert len(m["vllm:spec_decode_num_accepted_tokens_per_pos"]) == 4


def test_drafts_equal_reference_model(smollm2_runs, smollm2_fp32):
    """Drafts made inside vLLM equal the reference streams for the same context."""
    _, _, streams, log = smollm2_runs
    rate = draft_match_rate(smollm2_fp32[0], streams, log, 4)
    assert rate >= 0.97, f"only {rate:.1%} of draft tokens match the reference"


def test_drafts_read_the_token_vllm_sampled(smollm2_runs):
    """The token the streams are conditioned on (x_{t+1}, logged beside each draft) is the
    one vLLM output after that context: the reference comparison above replays drafts on
    the logged token, so this closes the chain for next-token-aware streams."""
    _, spec, _, log = smollm2_runs
    out = {}
    for b in spec["batches"]:
        for i, o in zip(b["indices"], b["outputs"]):
            out.setdefault(i, o)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(tuple(r["context"][:r["prompt_len"]]), []).append(r)
    assert len(by_prompt) == len(PROMPTS)       # each prompt's rows found by its tokens
    for (prompt, rs), o in zip(sorted(by_prompt.items(), key=lambda kv: min(
            rows.index(r) for r in kv[1])), (out[i] for i in range(len(PROMPTS)))):
        checked = 0
        for r in rs:
            k = len(r["context"]) - r["prompt_len"]
            if k >= len(o):       # the step that reached max_tokens: vLLM drops its tail
                continue
            assert r["context"][r["prompt_len"]:] == o[:k]
            assert r["next_token"] == o[k], f"prompt {len(prompt)} tokens, answer token {k}"
            checked += 1
        assert checked >= len(rs) - 2     # one final step each in the batch-1 and batch-8 runs


@pytest.fixture(scope="module", params=["paper", "next_token", "chain"])
def other_form_runs(request, smollm2_dir, smollm2_runs, tmp_path_factory):
    """Streams of each input form the shipped checkpoint does not use (paper, next-token-
    aware, chain: one stream per pass reading the previous draft), random but sharp,
    through the same prompts and batches."""
    from specstream_vllm.checkpoint import load_checkpoint_config, reads_tokens
    base, _, shipped, _ = smollm2_runs
    form = request.param
    if load_checkpoint_config(shipped).stream_input == form:
        pytest.skip(f"the shipped streams are of the {form} form (tested above)")
    tmp = tmp_path_factory.mktemp("form")
    streams = init_checkpoint(smollm2_dir, tmp / form, num_streams=4, num_stream_layers=4,
                              lora=LoraSpec(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                              random_lora_b=True, init_std=2.0, stream_input=form,
                              token_map_rank=16 if reads_tokens(form) else None)
    log = tmp / "drafts.jsonl"
    job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
           "batches": [[i] for i in range(len(PROMPTS))] + [list(range(len(PROMPTS)))],
           "spec": {"method": "specstream", "model": str(streams), "num_speculative_tokens": 4,
                    "match": "none"},
           "env": {"SPECSTREAM_DRAFT_LOG": str(log), "SPECSTREAM_DRAFT_PRECISION": "exact", "SPECSTREAM_MIN_DRAFT_PROB": "0",
                   "SPECSTREAM_DRAFT_POLICY": "fixed"}}
    return base, run_engine(job, tmp, f"spec-{form}"), streams, log


def test_other_stream_form_token_identical_batch1_and_batch8(other_form_runs):
    base, spec, _, _ = other_form_runs
    assert outputs(base) == outputs(spec)
    assert spec["metrics"]["vllm:spec_decode_num_drafts"] > 0


def test_other_stream_form_drafts_equal_reference(other_form_runs, smollm2_fp32):
    _, _, streams, log = other_form_runs
    rate = draft_match_rate(smollm2_fp32[0], streams, log, 4)
    assert rate >= 0.97, f"only {rate:.1%} of draft tokens match the reference"


def test_low_confidence_drafts_are_cut_output_unchanged(smollm2_runs, smollm2_dir, tmp_path):
    """min_draft_prob: shorter, better drafts (variable-length path), same greedy tokens."""
    base, spec, streams, _ = smollm2_runs
    job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
           "batches": [list(range(len(PROMPTS)))],
           "spec": {"method": "specstream", "model": str(streams), "num_speculative_tokens": 4,
                    "match": "none"},
           "env": {"SPECSTREAM_MIN_DRAFT_PROB": "0.2", "SPECSTREAM_DRAFT_POLICY": "fixed"}}
    res = run_engine(job, tmp_path, "cut")
    assert res["batches"][0]["outputs"] == base["batches"][-1]["outputs"]
    m, full = res["metrics"], spec["metrics"]
    assert 0 < m["vllm:spec_decode_num_draft_tokens"] < 4 * m["vllm:spec_decode_num_drafts"]
    rate = lambda x: x["vllm:spec_decode_num_accepted_tokens"] / x["vllm:spec_decode_num_draft_tokens"]  # noqa: E731
    assert rate(m) > rate(full)


def test_compiled_engine_and_stream_pass_token_identical(smollm2_dir, smollm2_runs, smollm2_fp32,
                                                         tmp_path):
    """torch.compile'd target and stream pass (the default without enforce_eager): greedy
    float32 output equals the compiled engine without speculation; drafts equal the reference.
    The stream pass compiles at start-up (its one-row specialisation too), not in a request."""
    _, _, streams, _ = smollm2_runs
    job = {"model": str(smollm2_dir), "prompts": PROMPTS[:4], "max_tokens": MAX_TOKENS[:4],
           "batches": [[0], [1], [0, 1, 2, 3]], "enforce_eager": False}
    base = run_engine(job, tmp_path, "compiled-base")
    log = tmp_path / "compiled-drafts.jsonl"
    spec = run_engine(dict(job, spec={"method": "specstream", "model": str(streams),
                                      "num_speculative_tokens": 4, "match": "none"},
                           env={"SPECSTREAM_DRAFT_LOG": str(log), "SPECSTREAM_DRAFT_PRECISION": "exact",
                                "SPECSTREAM_DRAFT_POLICY": "fixed", "TORCH_LOGS": "recompiles"}),
                      tmp_path, "compiled-spec")
    assert outputs(base) == outputs(spec)
    text = Path(spec["log"]).read_text(errors="replace")
    assert "stream pass attends through vLLM-CPU's attention kernels" in text
    warmed = text.find("compiled stream pass warmed up")
    assert warmed >= 0, "the compiled stream pass was not warmed up at start-up"
    recompiles = [m.start() for m in re.finditer(r"Recompiling function _stream_draft", text)]
    assert recompiles and max(recompiles) < warmed, "the stream pass compiled while serving"
    assert draft_match_rate(smollm2_fp32[0], streams, log, 4, max_rows=30) >= 0.97


@pytest.fixture(scope="module")
def tiny_tp_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tp") / "llama8", heads=8, kv_heads=4,
                           hidden=512, layers=4, vocab=512, seed=5)  # CPU attention needs head_dim 64


@pytest.mark.parametrize("precision", ["exact", "int8"])
def test_tensor_parallel_2_matches_tp2_without_speculation(tiny_tp_dir, tmp_path, precision):
    """TP 2, chain streams. ``exact``: drafts equal the float32 reference's. ``int8``: the
    stream layers run on int8 copies of their sharded weights (column shards local,
    row-parallel all-reduced; bf16 copies take the same path): the same output, and drafts
    that still agree with the reference almost everywhere (near-ties may flip)."""
    streams = init_checkpoint(tiny_tp_dir, tmp_path / "streams", num_streams=3, num_stream_layers=2,
                              lora=LoraSpec(rank=4, target_modules=list(
                                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))),
                              random_lora_b=True, init_std=0.5,
                              draft_vocab=list(range(3, 512, 2)),  # vocab-parallel head + restriction
                              stream_input="chain", token_map_rank=8)  # vocab-parallel embedding;
    # chain: one pass per stream, every rank reading rank 0's drafts
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 11, 17, 8)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    job = {"model": str(tiny_tp_dir), "prompts": prompts, "max_tokens": [24, 31, 16, 40],
           "tp": 2, "skip_tokenizer_init": True, "ignore_eos": True, "env": env, "max_model_len": 256,
           "batches": [[0], [0, 1, 2, 3]]}
    base = run_engine(job, tmp_path, "tp-base")
    log, dump = tmp_path / "tp-drafts.jsonl", tmp_path / "tp-policy.json"
    spec = run_engine(dict(job, spec={"method": "specstream", "model": str(streams),
                                      "num_speculative_tokens": 3, "match": "none"},
                           env=dict(env, SPECSTREAM_DRAFT_LOG=str(log), SPECSTREAM_DRAFT_POLICY="fixed",
                                    SPECSTREAM_DRAFT_PRECISION=precision,
                                    SPECSTREAM_POLICY_DUMP=str(dump))),
                      tmp_path, "tp-spec")  # every step drafts: the sharded pass is exercised
    assert outputs(base) == outputs(spec)
    assert spec["metrics"]["vllm:spec_decode_num_drafts"] > 0
    # a copy falls back to exact (with a warning) where this CPU's oneDNN lacks its matmul
    from specstream_vllm.vllm_integration.patches.kernels import onednn_matmul
    here = precision == "exact" or onednn_matmul(torch.randn(8, 8), torch.int8) is not None
    used = json.loads(dump.read_text())["draft_precision"]
    assert used == (precision if here else "exact")
    # the sharded stream LoRA (column- and row-parallel) drafts what the reference drafts
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tiny_tp_dir), dtype=torch.float32).eval()
    rate = draft_match_rate(model, streams, log, 3, max_rows=60)
    assert rate >= (0.97 if used == "exact" else 0.85), rate
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert all(t % 2 == 1 for r in rows for t in r["drafts"])  # drafts stay in the draft vocabulary


def test_seeded_sampling_runs_through_rejection_sampler(smollm2_dir, shipped_streams, tmp_path):
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp_path)
    job = {"model": str(smollm2_dir), "dtype": "bfloat16", "prompts": PROMPTS[:3],
           "max_tokens": [24, 24, 24], "temperature": 0.8,
           "spec": {"method": "specstream", "model": str(streams), "num_speculative_tokens": 3},
           "batches": [[0, 1, 2]]}
    res = run_engine(job, tmp_path, "sampled")
    assert all(0 < len(o) <= 24 for o in res["batches"][0]["outputs"])
    m = res["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    # every verified draft is attributed to the source that made it (the scheduler patch)
    by_source = {k: v for k, v in m.items()
                 if k.startswith("vllm:spec_decode_specstream_source_drafts{")}
    assert by_source and sum(by_source.values()) == m["vllm:spec_decode_num_drafts"], by_source
