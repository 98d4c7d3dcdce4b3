"""Medusa heads written by our trainer load and run in a real vLLM engine (slow).

Deselect with ``-m "not vllm"``. The engine runs as an engine job in its own process.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_medusa_checkpoint_runs_in_vllm(tmp_path):
    pytest.importorskip("vllm")
    from transformers import LlamaConfig, LlamaForCausalLM

    from specstream_vllm.training.data import Example
    from specstream_vllm.training.medusa import train_medusa
    from specstream_vllm.training.recipe import load_recipe

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,  # head_dim 64 (vLLM CPU attention)
                      tie_word_embeddings=True, initializer_range=0.2)
    cfg.architectures = ["LlamaForCausalLM"]
    base = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(str(base), safe_serialization=True)
    exs = [Example(f"c{i}", [1, 2, 3, 4], [7] * 30) for i in range(8)]
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "configs" / "train_tiny_test.yaml",
                         {"base_model": str(base), "output_dir": str(tmp_path / "run"), "max_steps": 3})
    medusa = train_medusa(recipe, exs, output_dir=tmp_path / "medusa", progress=False,
                          log=lambda s: None)
    from specstream_vllm.engine_job import run_in_subprocess
    job = {"llm_kwargs": {"model": str(base), "skip_tokenizer_init": True, "enforce_eager": True,
                          "dtype": "float32", "max_model_len": 128, "max_num_seqs": 4, "seed": 0,
                          "disable_log_stats": False,
                          "speculative_config": {"method": "medusa", "model": str(medusa),
                                                 "num_speculative_tokens": 3}},
           "prompts": [[5, 9, 7, 7, 7]], "max_tokens": 24, "skip_tokenizer_init": True,
           "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    batch = run_in_subprocess(job, tmp_path, "medusa", timeout=600)["batches"][0]
    ids = batch["outputs"][0]
    assert len(ids) == 24
    assert (batch["metrics"].get("vllm:spec_decode_num_drafts") or 0) > 0  # the heads really drafted
    # the same greedy continuation as plain HF greedy decoding of the base model
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ref = model.generate(torch.tensor([[5, 9, 7, 7, 7]]), max_new_tokens=24, do_sample=False)
    assert ids == ref[0, 5:].tolist()
