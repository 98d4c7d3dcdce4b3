"""Shared fixtures. Engines are expensive (20-60 s each): tests that start one are
marked ``vllm`` and share module-scoped fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a drafting error fails the test (a server logs it and runs the step without drafts)
os.environ.setdefault("SPECSTREAM_RAISE_ERRORS", "1")
# `dtype: auto` as on a machine that never ran `specstream check-dtype` and does not probe at
# start-up (float32 on a CPU), whatever this machine's own probe found
os.environ["SPECSTREAM_DTYPE_PROBE"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"specstream-tests-{os.getpid()}-dtype-probe.json")
os.environ["SPECSTREAM_DTYPE_PROBE_ON_START"] = "0"


def make_tiny_llama(path: Path, *, heads: int = 4, kv_heads: int = 2, layers: int = 4,
                    hidden: int = 64, vocab: int = 256, seed: int = 0,
                    arch: str = "llama") -> Path:
    """A random-weight model saved as a normal HF directory (safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
        Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    cfg_cls, model_cls = kinds[arch]
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init: fewer near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from specstream_vllm.default_model import default_model_dir
    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    return model, tok


@pytest.fixture(scope="session")
def shipped_streams() -> Path | None:
    from specstream_vllm.assets import shipped_streams_dir
    return shipped_streams_dir()
