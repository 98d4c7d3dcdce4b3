"""Trainer tests on a random tiny Llama (no vLLM, except the test marked ``vllm``)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from specstream_vllm.checkpoint import load_checkpoint
from specstream_vllm.errors import ConfigError
from specstream_vllm.training import data as data_mod
from specstream_vllm.training.data import Example
from specstream_vllm.training.recipe import Recipe, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train_tiny_test.yaml"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.2)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(d), safe_serialization=True)
    return d


def _examples(n: int = 16, seed: int = 0) -> list[Example]:
    """Learnable synthetic 'responses' for a frozen random model: mostly one token."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(200) for _ in range(rng.randrange(4, 10))]
        r = [7 if rng.random() < 0.9 else rng.randrange(200) for _ in range(rng.randrange(30, 50))]
        out.append(Example(f"c{i}", p, r, "length"))
    return out


def _recipe(tmp_path: Path, model_dir: Path, **over) -> Recipe:
    over = {"base_model": str(model_dir), "output_dir": str(tmp_path / "run"), **over}
    return load_recipe(TINY, over)


# --------------------------------------------------------------------------- recipe

def test_recipe_defaults_and_shipped_configs():
    r = Recipe()
    assert r.mode == "lossless" and r.num_streams == 4 and r.lr == 5e-4
    assert r.main_weight() == 0.0 and r.stream_weights() == [1.0] * 4
    shipped = load_recipe(ROOT / "configs" / "train_smollm2_lossless.yaml")
    assert shipped.num_stream_layers == 4 and shipped.mode == "lossless"
    ft = recipe_from_dict({"mode": "finetuned"})
    assert ft.main_weight() == 1.0 and ft.stream_weights() == [0.1] * 4


@pytest.mark.parametrize("raw, words", [
    ({"num_streamz": 3}, ["num_streamz", "unknown field"]),
    ({"mode": "fast"}, ["mode"]),
    ({"lr": -1}, ["lr"]),
    ({"loss": {"alpha0": 1.0}}, ["alpha0", "lossless"]),
    ({"num_streams": 3, "loss": {"alpha": [1, 1]}}, ["loss.alpha", "num_streams"]),
    ({"lora": {"rank": 4, "target_modules": ["qkv"]}}, ["qkv"]),
    ({"data": {"source": "alpaca"}}, ["data.source"]),
    ({"mode": "finetuned", "lora": None}, ["finetuned", "lora"]),
])
def test_recipe_validation_errors(raw, words):
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(raw, "test.yaml")
    msg = str(e.value)
    assert "test.yaml" in msg
    for w in words:
        assert w in msg


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_streams: [1,\n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_recipe(bad)
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"num_streams": 2, "eval_gammas": [2]}))
    assert load_recipe(js).num_streams == 2


# --------------------------------------------------------------------------- training

@pytest.mark.parametrize("vocab", ["full", "data"])
def test_tiny_training_loss_goes_down_and_checkpoint_loads(tmp_path, tiny_model, vocab):
    from safetensors.torch import load_file
    from specstream_vllm.training.trainer import train

    before = load_file(str(tiny_model / "model.safetensors"))
    recipe = _recipe(tmp_path, tiny_model, epochs=6, lr=3e-2, train_vocab=vocab)
    res = train(recipe, _examples(), progress=False, log=lambda s: None)
    log = [json.loads(l) for l in (Path(recipe.output_dir) / "train_log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < first * 0.7, (first, last)
    cfg, tensors = load_checkpoint(res.checkpoint_dir, base_model_dir=tiny_model,
                                   num_speculative_tokens=3)
    assert cfg.num_streams == 3 and cfg.num_stream_layers == 2 and cfg.mode == "lossless"
    assert cfg.training["steps"] == res.steps and cfg.training["stream_parameters"] == res.stream_params
    assert tensors["stream_embeddings"].shape == (3, 64)
    assert "layers.3.q_proj.lora_A" in tensors and "layers.1.q_proj.lora_A" not in tensors
    assert cfg.speculators_config.greedy_proposal().speculative_tokens == 3
    if vocab == "data":  # drafts are restricted to the tokens of the training responses
        want = torch.unique(torch.tensor([t for e in _examples() for t in e.response_ids]))
        assert cfg.draft_vocab_size == want.numel()
        assert torch.equal(tensors["draft_vocab"], want)
    else:
        assert cfg.draft_vocab_size is None and "draft_vocab" not in tensors
    # lossless: the base weights are untouched, bit for bit
    after = load_file(str(tiny_model / "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lossless_training_leaves_in_memory_base_bit_identical(tmp_path, tiny_model, monkeypatch):
    from specstream_vllm.training import trainer as tr

    seen = {}
    orig = tr.load_base_model

    def spy(*args):
        m = orig(*args)
        seen["model"] = m
        seen["before"] = {k: v.clone() for k, v in m.state_dict().items()}
        return m

    monkeypatch.setattr(tr, "load_base_model", spy)
    tr.train(_recipe(tmp_path, tiny_model, max_steps=4), _examples(), progress=False, log=lambda s: None)
    after = seen["model"].state_dict()
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    assert not any(p.requires_grad for p in seen["model"].parameters())


def test_resume_continues_from_state(tmp_path, tiny_model):
    from specstream_vllm.training.trainer import train

    r1 = _recipe(tmp_path, tiny_model, max_steps=5, checkpoint_every=5)
    train(r1, _examples(), progress=False, log=lambda s: None)
    r2 = _recipe(tmp_path, tiny_model, max_steps=8, checkpoint_every=5)
    msgs = []
    res = train(r2, _examples(), resume=True, progress=False, log=msgs.append)
    assert any("resumed" in m and "step 5" in m for m in msgs)
    assert res.steps == 8


def test_distill_mode_runs(tmp_path, tiny_model):
    from specstream_vllm.training.trainer import train

    res = train(_recipe(tmp_path, tiny_model, max_steps=3, distill=True), _examples(),
                progress=False, log=lambda s: None)
    assert res.steps == 3


def test_finetuned_mode_saves_merged_model_with_streams(tmp_path, tiny_model):
    from specstream_vllm.checkpoint import STREAMS_SUBDIR
    from specstream_vllm.training.trainer import train

    r = _recipe(tmp_path, tiny_model, mode="finetuned", max_steps=3, loss={"alpha0": 1.0})
    res = train(r, _examples(), progress=False, log=lambda s: None)
    merged = Path(r.output_dir) / "model"
    assert (merged / "config.json").is_file() and (merged / STREAMS_SUBDIR / "config.json").is_file()
    cfg, _ = load_checkpoint(merged, base_model_dir=merged)
    assert cfg.mode == "finetuned" and cfg.lora is None
    assert res.checkpoint_dir == merged / STREAMS_SUBDIR


# --------------------------------------------------------------------------- data cache

def test_data_cache_reused(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("SPECSTREAM_CACHE", str(tmp_path / "cache"))

    class Tok:  # a stand-in tokenizer: chat template = "<u>" + text
        def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
            return "<u>" + msgs[0]["content"]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 256 for c in text]}

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: Tok())
    turns = [(f"id{i}_0", f"question number {i} please") for i in range(400)]
    monkeypatch.setattr(data_mod, "sharegpt_first_turns", lambda path=None: turns)
    monkeypatch.setattr(data_mod, "mtbench_texts_normalized", lambda: {"question number 3 please"})
    calls = []

    def fake_gen(model_dir, prompts, spec):
        calls.append(len(prompts))
        return [([1, 2, 3, len(p) % 7], "length") for p in prompts]

    spec = load_recipe(TINY).data
    a = data_mod.build_sets(tiny_model, spec, ["train", "heldout"], generator=fake_gen, log=lambda s: None)
    assert calls == [len(a["train"]) + len(a["heldout"])]
    assert len(a["train"]) == spec.num_train_prompts and len(a["heldout"]) == spec.num_heldout
    tr_ids = {e.id.rsplit("_", 1)[0] for e in a["train"]}
    assert not tr_ids & {e.id.rsplit("_", 1)[0] for e in a["heldout"]}
    assert "id3_0" not in {e.id for e in a["train"] + a["heldout"]}  # MT-Bench text excluded
    b = data_mod.build_sets(tiny_model, spec, ["train", "heldout"], generator=fake_gen, log=lambda s: None)
    assert calls == [len(a["train"]) + len(a["heldout"])]  # no second generation
    assert [e.tokens for e in b["train"]] == [e.tokens for e in a["train"]]
    # a changed generation setting invalidates the cache
    spec2 = spec.model_copy(update={"max_new_tokens": 16})
    data_mod.build_sets(tiny_model, spec2, ["train"], generator=fake_gen, log=lambda s: None)
    assert len(calls) == 2


# --------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("vocab", ["full", "data"])
def test_eval_matches_reference_speculative_decoder(tmp_path, tiny_model, monkeypatch, vocab):
    """One-forward acceptance == step-by-step greedy speculative decoding, draft by draft
    (with and without a draft vocabulary)."""
    from specstream_vllm.reference import decoder as dec
    from specstream_vllm.reference.streams import StreamParams
    from specstream_vllm.training.evaluate import acceptance_on, stream_drafter
    from specstream_vllm.training.trainer import load_base_model, train

    res = train(_recipe(tmp_path, tiny_model, epochs=3, lr=3e-2, train_vocab=vocab), _examples(),
                progress=False, log=lambda s: None)
    model = load_base_model(tiny_model, torch.float32)
    cfg, tensors = load_checkpoint(res.checkpoint_dir)
    params = StreamParams.from_checkpoint(model.config, cfg, tensors)
    assert (params.draft_vocab is not None) == (vocab == "data")
    records: list[tuple[int, int]] = []
    orig = dec.ReferenceAcceptance.record

    def rec(self, gamma, accepted):
        records.append((gamma, accepted))
        return orig(self, gamma, accepted)

    monkeypatch.setattr(dec.ReferenceAcceptance, "record", rec)
    for prompt in ([5, 9, 7, 7, 7], [100, 3, 7]):
        records.clear()
        out, _ = dec.speculative_generate(model, params, torch.tensor([prompt]), 40, gamma=3)
        ref = list(records)
        records.clear()
        rep = acceptance_on(model, [Example("e", prompt, out)], {"s": (stream_drafter(params, 3), 3)},
                            list(params.layer_ids), [3], progress=False)
        sim = list(records)
        assert rep["main_argmax_agreement_with_answer"] == 1.0
        # the simulation stops when a full draft no longer fits; before that it is exact
        assert len(sim) >= 1 and len(sim) >= len(ref) - 3
        assert sim == ref[:len(sim)]


def test_medusa_trains_saves_and_drafts(tmp_path, tiny_model):
    from specstream_vllm.training.evaluate import acceptance_on
    from specstream_vllm.training.medusa import load_medusa_drafter, train_medusa
    from specstream_vllm.training.trainer import load_base_model
    from safetensors.torch import load_file

    r = _recipe(tmp_path, tiny_model, max_steps=6, lr=3e-2)
    out = train_medusa(r, _examples(), output_dir=tmp_path / "medusa", progress=False,
                       log=lambda s: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "medusa" and cfg["num_heads"] == 3 and cfg["original_lm_head"]
    t = load_file(str(out / "model.safetensors"))
    assert set(t) == {"blocks.0.layers.0.weight", "blocks.1.layers.0.weight",
                      "blocks.2.layers.0.weight", "lm_heads.0.weight"}
    assert t["lm_heads.0.weight"].shape == (256, 64)
    assert t["blocks.0.layers.0.weight"].abs().sum() > 0  # trained away from the zero init
    model = load_base_model(tiny_model, torch.float32)
    draft, k, info = load_medusa_drafter(out, model)
    assert k == 3 and info["trainable"] == 3 * 64 * 64
    rep = acceptance_on(model, _examples(2), {"medusa": (draft, 3)}, [], [1, 2, 3], progress=False)
    assert rep["drafters"]["medusa"]["gamma_3"]["num_drafts"] > 0


def test_cli_parsers_register():
    import argparse
    from specstream_vllm.training.cli import (add_eval_parser, add_medusa_parser,
                                              add_train_parser)
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    add_train_parser(sub), add_eval_parser(sub), add_medusa_parser(sub)
    a = ap.parse_args(["train", "--recipe", str(TINY), "--set", "epochs=2", "--resume"])
    assert a.resume and a.func.__name__ == "_run_train"
    from specstream_vllm.training.cli import _recipe
    assert _recipe(a).epochs == 2
    a = ap.parse_args(["eval", "-c", "x", "--gammas", "2,3"])
    assert a.gammas == "2,3"
