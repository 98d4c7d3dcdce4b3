"""Medusa heads written by our trainer load and run in a real vLLM engine (slow).

Deselect with ``-m "not vllm"``. The engine is started in a subprocess script with the
``__main__`` guard that vLLM's spawned workers need.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        base, medusa, out = sys.argv[1:4]
        llm = LLM(model=base, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
                  max_model_len=128, max_num_seqs=4, seed=0, disable_log_stats=False,
                  speculative_config={"method": "medusa", "model": medusa,
                                      "num_speculative_tokens": 3})
        sp = SamplingParams(temperature=0.0, max_tokens=24, detokenize=False)
        res = llm.generate([TokensPrompt(prompt_token_ids=[5, 9, 7, 7, 7])], sp)
        ids = list(res[0].outputs[0].token_ids)
        metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics()
                   if "spec_decode" in m.name}
        json.dump({"ids": ids, "metrics": metrics}, open(out, "w"))
''')


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
    script = tmp_path / "run_vllm.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    r = subprocess.run([sys.executable, str(script), str(base), str(medusa), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    (tmp_path / "vllm.log").write_text(r.stdout + r.stderr)
    errors = [l for l in r.stderr.splitlines() if "Error" in l]
    assert r.returncode == 0, "\n".join(errors[-10:]) or r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert len(res["ids"]) == 24
    assert (res["metrics"].get("vllm:spec_decode_num_drafts") or 0) > 0  # the heads really drafted
    # the same greedy continuation as plain HF greedy decoding of the base model
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ref = model.generate(torch.tensor([[5, 9, 7, 7, 7]]), max_new_tokens=24, do_sample=False)
    assert res["ids"] == ref[0, 5:].tolist()
