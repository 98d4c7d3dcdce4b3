"""The MSA models of the other families inside real vLLM engines: Qwen2 (the Llama layout
with q/k/v biases), Qwen3 (q/k-norm before
rotary), OPT (learned positions), Phi (vLLM's Transformers backend: parallel attention and
MLP, partial rotary, q/k LayerNorms, LM-head bias), GPT-2 (fused c_attn, learned
positions) and BLOOM (ALiBi, per-head interleaved query_key_value).

Tiny random-weight float32 models (head_dim 64: vLLM-CPU attention supports 32, 64, 80, ...)
built from transformers configs; token-id prompts, no tokenizer. Per family one engine
without speculation and one specstream engine (every step drafts: fixed policy, no cut,
no match source; streams written by the trainer: two steps from random streams with LoRA
on every canonical target the family has, next-token-aware, a draft vocabulary). GPT-2 and BLOOM run both engines at tensor parallel 2, which
also covers their LoRA sharding and BLOOM's ALiBi slopes split across ranks; Qwen3, OPT
and Phi run at TP 1 (the single-rank draft head over the draft vocabulary's rows).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specstream_vllm.checkpoint import LoraSpec
from specstream_vllm.reference.init import init_checkpoint
from tests.test_vllm_integration import draft_match_rate, outputs, run_engine

pytestmark = pytest.mark.vllm

VOCAB = 512
PROMPT_LENS = (5, 11, 17, 8, 3, 9, 14, 6)
MAX_TOKENS = [16, 20, 12, 24, 18, 10, 22, 14]
BATCHES = [[0], [1], [2], list(range(len(PROMPT_LENS)))]  # batch 1 three times, then batch 8
UNGATED = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
#: family -> (tensor parallel size, LoRA targets)
FAMILIES = {"qwen2": (1, UNGATED + ["gate_proj"]), "qwen3": (1, UNGATED + ["gate_proj"]), "opt": (1, UNGATED), "phi": (1, UNGATED),
            "gpt2": (2, UNGATED), "bloom": (2, UNGATED)}


def make_tiny(kind: str, path: Path, *, hidden: int = 256, heads: int = 4, layers: int = 4,
              seed: int = 0) -> Path:
    """A random-weight model of one family saved as an HF directory. The final norm is
    scaled by 8 (sharper logits, fewer near-ties); BLOOM's vLLM model only loads tied
    embeddings, which make a random model repeat its input token, so its weights are
    larger and the final norm's scale has random signs."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "qwen2":  # the Llama layout with q/k/v biases
        model = T.Qwen2ForCausalLM(T.Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=512,
            tie_word_embeddings=False, **common))
        norm = model.model.norm
    elif kind == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
            max_position_embeddings=512, tie_word_embeddings=False, **common))
        norm = model.model.norm
    elif kind == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=hidden, n_head=heads, n_layer=layers,
                                               n_positions=512, tie_word_embeddings=False, **common))
        norm = model.transformer.ln_f
    elif kind == "opt":
        model = T.OPTForCausalLM(T.OPTConfig(
            hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
            ffn_dim=2 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=512,
            tie_word_embeddings=False, **common))
        norm = model.model.decoder.final_layer_norm
    elif kind == "phi":
        model = T.PhiForCausalLM(T.PhiConfig(
            hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
            intermediate_size=2 * hidden, partial_rotary_factor=0.5, qk_layernorm=True,
            max_position_embeddings=512, tie_word_embeddings=False, **common))
        norm = model.model.final_layernorm
        with torch.no_grad():
            model.lm_head.bias.normal_(0, 2.0)  # the draft head must add its bias rows
    elif kind == "bloom":
        model = T.BloomForCausalLM(T.BloomConfig(hidden_size=hidden, n_head=heads, n_layer=layers,
                                                 initializer_range=0.1, **common))
        norm = model.transformer.ln_f
    else:
        raise ValueError(kind)
    scale = 8.0 * (torch.randint(0, 2, (hidden,)) * 2 - 1) if kind == "bloom" else 8.0
    with torch.no_grad():
        norm.weight.mul_(scale)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(scale)
    model.eval().save_pretrained(str(path), safe_serialization=True)
    return path


def trained_streams(model_dir: Path, tmp: Path, targets: list[str]) -> Path:
    """What vLLM serves here is written by the trainer: two lossless steps (next-token-aware
    form, LoRA on every target the family has) continuing random streams whose LoRA B and
    g are non-zero and whose draft vocabulary is the odd token ids, so every part of the
    stream pass changes the drafts."""
    from specstream_vllm.training.recipe import load_recipe
    from specstream_vllm.training.trainer import train
    from tests.test_training import TINY, _examples

    lora = LoraSpec(rank=4, target_modules=targets)
    init = init_checkpoint(model_dir, tmp / "init", num_streams=3, num_stream_layers=2, lora=lora,
                           random_lora_b=True, init_std=0.5, draft_vocab=list(range(3, VOCAB, 2)),
                           stream_input="next_token", token_map_rank=8)
    recipe = load_recipe(TINY, {"base_model": str(model_dir), "output_dir": str(tmp / "trained"),
                                "init_from": str(init), "max_steps": 2, "num_streams": 3,
                                "num_stream_layers": 2, "stream_input": "next_token",
                                "token_map_rank": 8, "lora": lora.model_dump()})
    res = train(recipe, _examples(), progress=False, log=lambda s: None)
    assert res.steps == 2
    return res.checkpoint_dir


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_runs(request, tmp_path_factory):
    kind = request.param
    tp, targets = FAMILIES[kind]
    tmp = tmp_path_factory.mktemp(kind)
    model_dir = make_tiny(kind, tmp / kind)
    streams = trained_streams(model_dir, tmp, targets)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    # TP 1: engine core and worker in the job's own process (vLLM's "uni" executor) on one
    # thread: ~12 s per engine instead of ~35 s here; TP 2: one thread per rank
    env = ({"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2
           else {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"})
    job = {"model": str(model_dir), "prompts": prompts, "max_tokens": MAX_TOKENS, "tp": tp,
           "skip_tokenizer_init": True, "ignore_eos": True, "max_model_len": 256,
           "batches": BATCHES, "env": env}
    base = run_engine(job, tmp, "base")
    log = tmp / "drafts.jsonl"
    spec = run_engine(dict(job, spec={"method": "specstream", "model": str(streams),
                                      "num_speculative_tokens": 3, "match": "none"},
                           env=dict(env, SPECSTREAM_DRAFT_LOG=str(log), SPECSTREAM_DRAFT_PRECISION="exact", SPECSTREAM_DRAFT_POLICY="fixed",
                                    SPECSTREAM_MIN_DRAFT_PROB="0")), tmp, "spec")
    return kind, model_dir, base, spec, streams, log


def test_greedy_float32_token_identical_batch1_and_batch8(family_runs):
    kind, _, base, spec, _, _ = family_runs
    for b0, b1 in zip(base["batches"], spec["batches"]):
        assert b0["outputs"] == b1["outputs"], f"{kind}: batch {b0['indices']} differs"
    assert outputs(base) == outputs(spec)
    assert len({t for o in outputs(base).values() for t in o}) > 20  # not a repeating model
    m = spec["metrics"]
    assert m["vllm:spec_decode_num_drafts"] > 0
    assert m["vllm:spec_decode_num_draft_tokens"] == 3 * m["vllm:spec_decode_num_drafts"]


def test_drafts_equal_reference_model(family_runs):
    """Drafts made inside vLLM (at the family's TP size) equal the reference streams for
    the same context and sampled token; drafts stay in the draft vocabulary."""
    from transformers import AutoModelForCausalLM
    kind, model_dir, _, _, streams, log = family_runs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: two OpenMP threads on a busy 2-core box are 100x slower
    try:
        rate = draft_match_rate(model, streams, log, 3, max_rows=40)
    finally:
        torch.set_num_threads(threads)
    assert rate >= 0.97, f"{kind}: only {rate:.1%} of draft tokens match the reference"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert all(t % 2 == 1 for r in rows for t in r["drafts"])
