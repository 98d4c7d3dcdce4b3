"""Bad input fails at start-up, in the front-end process, with words (no worker trace).

``EngineArgs.create_engine_config`` is exactly what ``LLM(...)`` and ``vllm serve`` run
before any engine process exists; the plugin loads inside it as it does in vLLM.
"""
from __future__ import annotations

import importlib.abc
import json
import sys

import pytest

from specstream_vllm.checkpoint import LoraSpec
from specstream_vllm.reference.init import init_checkpoint
from tests.conftest import make_tiny_llama


class _BlockArctic(importlib.abc.MetaPathFinder):
    """An install without arctic-inference, simulated in this process."""

    def find_spec(self, name, path=None, target=None):
        if name == "arctic_inference" or name.startswith("arctic_inference."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def without_arctic(monkeypatch):
    for name in [m for m in sys.modules if m == "arctic_inference" or m.startswith("arctic_inference.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockArctic(), *sys.meta_path])


def engine_config(model, spec):
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=str(model), speculative_config=spec, max_model_len=256,
                      skip_tokenizer_init=True).create_engine_config()


@pytest.fixture(scope="module")
def streams(tiny_llama_dir, tmp_path_factory):
    return init_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("s") / "streams",
                           num_streams=3, num_stream_layers=2, lora=LoraSpec(rank=2))


def test_valid_config_swaps_in_the_msa_model(tiny_llama_dir, streams):
    cfg = engine_config(tiny_llama_dir, {"method": "specstream", "model": str(streams),
                                         "match": "none"})
    spec = cfg.speculative_config
    assert spec.method == "specstream" and spec.num_speculative_tokens == 3
    assert cfg.model_config.hf_config.architectures == ["SpecStreamLlamaForCausalLM"]
    assert cfg.model_config.hf_config.specstream["num_stream_layers"] == 2
    assert cfg.num_lookahead_tokens == 3  # the scheduler reserves the stream slots
    # the default match source drafts up to 8 matched tokens: vLLM verifies up to 8
    cfg = engine_config(tiny_llama_dir, {"method": "specstream", "model": str(streams)})
    assert cfg.speculative_config.num_speculative_tokens == 8 == cfg.num_lookahead_tokens
    assert cfg.model_config.hf_config.specstream_policy["match"]["max_tokens"] == 8


def test_other_methods_untouched(tiny_llama_dir):
    cfg = engine_config(tiny_llama_dir, {"method": "ngram", "num_speculative_tokens": 2,
                                         "prompt_lookup_max": 3})
    assert cfg.model_config.hf_config.architectures == ["LlamaForCausalLM"]
    assert cfg.num_lookahead_tokens == 0
    cfg = engine_config(tiny_llama_dir, None)
    assert cfg.speculative_config is None


def test_missing_checkpoint(tiny_llama_dir, tmp_path):
    """What ``vllm serve`` and ``LLM()`` show: our one-line error, not pydantic's dump."""
    from specstream_vllm.errors import SpecStreamError
    with pytest.raises(SpecStreamError, match="does not exist") as err:
        engine_config(tiny_llama_dir, {"method": "specstream", "model": str(tmp_path / "x"),
                                       "num_speculative_tokens": 2})
    assert "\n" not in str(err.value) and "validation error" not in str(err.value)


def test_malformed_checkpoint(tiny_llama_dir, streams, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(streams, bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "specstream", "format_version": 1}))
    with pytest.raises(ValueError, match="malformed"):
        engine_config(tiny_llama_dir, {"method": "specstream", "model": str(bad)})


def test_checkpoint_for_another_base_model(streams, tmp_path):
    other = make_tiny_llama(tmp_path / "other", seed=11)
    with pytest.raises(ValueError, match="trained for base model"):
        engine_config(other, {"method": "specstream", "model": str(streams)})


def test_gamma_above_trained_streams(tiny_llama_dir, streams):
    with pytest.raises(ValueError, match="only 3 trained streams"):
        engine_config(tiny_llama_dir, {"method": "specstream", "model": str(streams),
                                       "num_speculative_tokens": 5})


def test_missing_model_field(tiny_llama_dir):
    with pytest.raises(ValueError, match="needs \"model\""):
        engine_config(tiny_llama_dir, {"method": "specstream", "num_speculative_tokens": 2})


def test_unsupported_architecture(tmp_path, streams):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(0)
    d = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=256)).save_pretrained(str(d))
    with pytest.raises(ValueError, match="does not support architecture GPTNeoXForCausalLM") as err:
        engine_config(d, {"method": "specstream", "model": str(streams)})
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM",
                 "BloomForCausalLM", "PhiForCausalLM"):
        assert arch in str(err.value)  # the error names what is supported


@pytest.mark.parametrize("variant,words", [
    ({"do_layer_norm_before": False}, "post-layer-norm OPT"),
    ({"word_embed_proj_dim": 32}, "project_in/out"),
])
def test_unsupported_opt_variant(tmp_path, streams, variant, words):
    """OPT variants the stream pass does not model (opt-350m's post-LN, project_in/out)
    fail in the front end, before the checkpoint is even read."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    d = tmp_path / "opt"
    cfg = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
               vocab_size=256, word_embed_proj_dim=64, max_position_embeddings=256)
    OPTForCausalLM(OPTConfig(**dict(cfg, **variant))).save_pretrained(str(d))
    with pytest.raises(ValueError, match=words):
        engine_config(d, {"method": "specstream", "model": str(streams)})


def test_version_mismatch_is_refused(monkeypatch):
    from specstream_vllm.errors import VersionMismatchError
    from specstream_vllm.vllm_integration import patches as compat
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.31.9")
    with pytest.raises(VersionMismatchError, match="pinned to vLLM 0.32.0 but vLLM 0.31.9"):
        compat.check_vllm_version()
    monkeypatch.setenv(compat.VERSION_OVERRIDE_ENV, "1")
    assert compat.check_vllm_version() == "0.31.9"


def test_min_draft_prob_from_checkpoint_and_env(tiny_llama_dir, streams, tmp_path, monkeypatch):
    import shutil
    ck = tmp_path / "cut"
    shutil.copytree(streams, ck)
    raw = json.loads((ck / "config.json").read_text())
    raw["speculators_config"]["proposal_methods"] = [{"proposal_type": "greedy", "min_draft_prob": 0.25}]
    (ck / "config.json").write_text(json.dumps(raw))
    spec = {"method": "specstream", "model": str(ck)}
    assert engine_config(tiny_llama_dir, spec).model_config.hf_config.specstream["min_draft_prob"] == 0.25
    monkeypatch.setenv("SPECSTREAM_MIN_DRAFT_PROB", "0.5")
    assert engine_config(tiny_llama_dir, spec).model_config.hf_config.specstream["min_draft_prob"] == 0.5
    monkeypatch.setenv("SPECSTREAM_MIN_DRAFT_PROB", "1.5")
    with pytest.raises(ValueError, match="must be a probability"):
        engine_config(tiny_llama_dir, spec)
    monkeypatch.delenv("SPECSTREAM_MIN_DRAFT_PROB")
    # the speculative config's key: beats the checkpoint, the environment beats it
    keyed = dict(spec, min_draft_prob=0.4)
    assert engine_config(tiny_llama_dir, keyed).model_config.hf_config.specstream["min_draft_prob"] == 0.4
    monkeypatch.setenv("SPECSTREAM_MIN_DRAFT_PROB", "0.5")
    assert engine_config(tiny_llama_dir, keyed).model_config.hf_config.specstream["min_draft_prob"] == 0.5
    monkeypatch.delenv("SPECSTREAM_MIN_DRAFT_PROB")
    with pytest.raises(ValueError, match=r"min_draft_prob\"=1.5.*less than 1"):
        engine_config(tiny_llama_dir, dict(spec, min_draft_prob=1.5))
    raw["speculators_config"]["proposal_methods"] = [{"proposal_type": "greedy", "min_draft_prob": -1}]
    (ck / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="malformed"):
        engine_config(tiny_llama_dir, spec)


def test_tensor_shape_mismatch_fails_in_the_front_end(tiny_llama_dir, streams, tmp_path):
    """An edited config.json no longer matching the tensors: one line, before any worker."""
    import shutil
    bad = tmp_path / "edited"
    shutil.copytree(streams, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["lora"]["rank"] = 4
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="does not match its config.json: 'layers.2.q_proj.lora_A'"):
        engine_config(tiny_llama_dir, {"method": "specstream", "model": str(bad)})


def test_draft_policy_key_default_env_and_refusal(tiny_llama_dir, streams, monkeypatch):
    """``draft_policy`` rides in the user's speculative config (vLLM's own SpeculativeConfig
    forbids unknown keys; compat takes it out) and reaches the workers' hf_config."""
    base = {"method": "specstream", "model": str(streams)}
    policy = lambda spec: engine_config(tiny_llama_dir, spec).model_config.hf_config.specstream_policy  # noqa: E731
    assert policy(base)["mode"] == "auto"
    assert policy(dict(base, draft_policy="fixed"))["mode"] == "fixed"
    monkeypatch.setenv("SPECSTREAM_DRAFT_POLICY", "auto")
    assert policy(dict(base, draft_policy="fixed"))["mode"] == "auto"
    monkeypatch.delenv("SPECSTREAM_DRAFT_POLICY")
    monkeypatch.setenv("SPECSTREAM_MIN_DRAFT_PROB", "0.3")   # an explicit cut: fixed policy
    assert policy(base)["mode"] == "fixed"
    assert policy(dict(base, draft_policy="auto"))["mode"] == "auto"
    monkeypatch.delenv("SPECSTREAM_MIN_DRAFT_PROB")
    assert policy(dict(base, min_draft_prob=0.3))["mode"] == "fixed"  # the key: the same rule
    with pytest.raises(ValueError, match="draft_policy"):
        engine_config(tiny_llama_dir, dict(base, draft_policy="sometimes"))
    with pytest.raises(Exception, match="draft_policy"):  # vLLM's own refusal for other methods
        engine_config(tiny_llama_dir, {"method": "ngram", "num_speculative_tokens": 2,
                                       "prompt_lookup_max": 3, "draft_policy": "auto"})


def test_draft_precision_key_default_env_and_refusal(tiny_llama_dir, streams, monkeypatch):
    """``draft_precision`` (auto | exact | bfloat16 | int8) rides in the speculative config to the
    workers' stream settings; the environment overrides it; anything else is refused."""
    monkeypatch.delenv("SPECSTREAM_DRAFT_PRECISION", raising=False)
    base = {"method": "specstream", "model": str(streams)}
    setting = lambda spec: engine_config(tiny_llama_dir, spec).model_config.hf_config.specstream["draft_precision"]  # noqa: E731
    assert setting(base) == "auto"
    assert setting(dict(base, draft_precision="exact")) == "exact"
    assert setting(dict(base, draft_precision="int8")) == "int8"
    monkeypatch.setenv("SPECSTREAM_DRAFT_PRECISION", "bfloat16")
    assert setting(dict(base, draft_precision="exact")) == "bfloat16"
    monkeypatch.delenv("SPECSTREAM_DRAFT_PRECISION")
    with pytest.raises(ValueError, match="draft_precision.*'half'"):
        engine_config(tiny_llama_dir, dict(base, draft_precision="half"))


def test_missing_match_package_is_one_line_before_any_worker(without_arctic):
    """The default match source ("suffix") needs arctic-inference: without it the front
    end refuses in one line naming the pip command (the workers would each fail later)."""
    from specstream_vllm.errors import ConfigError
    from specstream_vllm.options import SpecStreamOptions, match_source
    with pytest.raises(ConfigError, match=r"^match source \"suffix\" \(the default\) needs "
                                          r"arctic-inference .*: pip install arctic-inference") as err:
        match_source(SpecStreamOptions(), None)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="^match source \"suffix\" needs"):
        match_source(SpecStreamOptions(match="suffix"), "none")  # the options' key wins ...
    assert match_source(SpecStreamOptions(match="none"), "suffix") == "none"
    assert match_source(SpecStreamOptions(), "ngram") == "ngram"  # ... then the checkpoint's


def test_missing_match_package_refused_by_the_engine_config(tiny_llama_dir, streams, without_arctic,
                                                            monkeypatch):
    from specstream_vllm.errors import ConfigError
    base = {"method": "specstream", "model": str(streams)}
    with pytest.raises(ConfigError, match="pip install arctic-inference") as err:
        engine_config(tiny_llama_dir, base)
    assert "\n" not in str(err.value)
    cfg = engine_config(tiny_llama_dir, dict(base, match="ngram"))
    assert cfg.model_config.hf_config.specstream_policy["match"]["source"] == "ngram"
    monkeypatch.setenv("SPECSTREAM_MATCH", "none")  # the environment's override counts too
    assert engine_config(tiny_llama_dir, base).model_config.hf_config.specstream_policy["match"]["source"] == "none"
