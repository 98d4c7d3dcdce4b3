"""The Python API (specstream_vllm.SpeculativeEngine / LoRAAdapter / DeploymentConfig).

Validation tests start no engine; the engine tests share ONE module-scoped
SpeculativeEngine on SmolLM2 (float32, enforce_eager) plus one baseline engine
subprocess started by ``benchmark()`` for the greedy-equality check.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specstream_vllm.errors import CheckpointError, ConfigError, SpecStreamError
from specstream_vllm.reference.init import init_checkpoint
from tests.test_startup_errors import without_arctic  # noqa: F401 (fixture)
from tests.test_vllm_integration import streams_for_smollm2


@pytest.fixture(scope="module")
def streams(smollm2_dir, shipped_streams, tmp_path_factory) -> Path:
    return streams_for_smollm2(smollm2_dir, shipped_streams, tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def two_streams(smollm2_dir, tmp_path_factory) -> Path:
    return init_checkpoint(smollm2_dir, tmp_path_factory.mktemp("two") / "s2", num_streams=2,
                           num_stream_layers=2)


# --------------------------------------------------------------------------- cheap import

def test_import_is_lazy():
    code = ("import sys, specstream_vllm as s; assert 'torch' not in sys.modules and "
            "'vllm' not in sys.modules; assert 'SpeculativeEngine' in s.__all__; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_public_names():
    import specstream_vllm as s
    from specstream_vllm.api.engine import SpeculativeEngine
    assert s.SpeculativeEngine is SpeculativeEngine
    assert issubclass(s.TreeDraftingNotSupportedError, SpecStreamError)
    assert issubclass(s.TreeDraftingNotSupportedError, NotImplementedError)
    with pytest.raises(AttributeError):
        s.NoSuchThing  # noqa: B018


# --------------------------------------------------------------------------- engine validation (no engine)

@pytest.mark.parametrize("gamma", [0, 1, 9, 4.0, "4", True])
def test_gamma_out_of_range(streams, gamma):
    from specstream_vllm import SpeculativeEngine
    with pytest.raises(ConfigError, match="gamma"):
        SpeculativeEngine(streams=str(streams), gamma=gamma)


def test_gamma_above_num_streams(two_streams):
    from specstream_vllm import SpeculativeEngine
    with pytest.raises(ConfigError, match="only 2 trained streams"):
        SpeculativeEngine(streams=str(two_streams), gamma=3)


@pytest.mark.parametrize("device", ["tpu", "gpu", ""])
def test_unknown_device(streams, device):
    from specstream_vllm import DeviceError, SpeculativeEngine
    with pytest.raises(DeviceError, match="device"):
        SpeculativeEngine(streams=str(streams), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu(streams):
    from specstream_vllm import DeviceError, SpeculativeEngine
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        SpeculativeEngine(streams=str(streams), device="cuda")


@pytest.mark.parametrize("kw", [{"tree_depth": 3}, {"tree_width": 2}, {"early_exit": True},
                                {"tree_top_k": 4}, {"tree_depth": 2, "tree_width": 3}])
def test_tree_parameters_are_refused(streams, kw):
    from specstream_vllm import SpeculativeEngine, TreeDraftingNotSupportedError
    with pytest.raises(TreeDraftingNotSupportedError, match="tree drafting .* not supported yet"):
        SpeculativeEngine(streams=str(streams), **kw)


def test_tree_parameters_off_are_accepted_but_validated(streams):
    from specstream_vllm import SpeculativeEngine
    eng = SpeculativeEngine(streams=str(streams), early_exit=False, tree_depth=None, lazy=True)
    assert eng.gamma == 4 and eng.llm_kwargs()["speculative_config"] == {
        "method": "specstream", "num_speculative_tokens": 4, "model": str(streams)}
    eng.shutdown()  # never started: nothing to stop


@pytest.mark.parametrize("kw", [{"min_p": 0.05}, {"logit_bias": {"42": 5.0}}])
def test_sampling_parameters_vllm_refuses_with_speculation(streams, kw):
    """vLLM answers 400 to min_p / logit_bias with any speculative method: refused up front."""
    from specstream_vllm import SamplingParameterNotSupportedError, SpeculativeEngine
    with pytest.raises(SamplingParameterNotSupportedError, match="refuses min_p and logit_bias"):
        SpeculativeEngine(streams=str(streams), **kw)  # before the engine starts
    eng = SpeculativeEngine(streams=str(streams), lazy=True)
    with pytest.raises(SamplingParameterNotSupportedError, match=next(iter(kw))):
        eng.generate("hi", **kw)
    assert eng._llm is None  # refused without starting the engine
    assert issubclass(SamplingParameterNotSupportedError, ConfigError)


def test_other_bad_arguments(streams, smollm2_dir, tmp_path):
    from specstream_vllm import SpeculativeEngine, StreamsNotFoundError
    with pytest.raises(ConfigError, match="speculative_config"):
        SpeculativeEngine(streams=str(streams), speculative_config={"method": "ngram"})
    with pytest.raises(ConfigError, match="temperature"):
        SpeculativeEngine(streams=str(streams), temperature=-1)
    with pytest.raises(ConfigError, match="dtype"):
        SpeculativeEngine(streams=str(streams), dtype="int3")
    for bad in (1.0, -0.1, "0.2"):
        with pytest.raises(ConfigError, match="min_draft_prob"):
            SpeculativeEngine(streams=str(streams), min_draft_prob=bad, lazy=True)
    with pytest.raises(ConfigError, match="draft_policy"):
        SpeculativeEngine(streams=str(streams), draft_policy="sometimes", lazy=True)
    eng = SpeculativeEngine(streams=str(streams), draft_policy="fixed", lazy=True)
    assert eng.llm_kwargs()["speculative_config"]["draft_policy"] == "fixed"
    assert "match" not in eng.llm_kwargs()["speculative_config"]   # the checkpoint's default
    for bad in ({"match": "regex"}, {"match_tokens": 0}, {"match_tokens": 65}, {"match_tokens": 2.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SpeculativeEngine(streams=str(streams), lazy=True, **bad)
    eng = SpeculativeEngine(streams=str(streams), match="ngram", match_tokens=8, lazy=True)
    spec = eng.llm_kwargs()["speculative_config"]
    assert (spec["match"], spec["match_tokens"]) == ("ngram", 8)
    with pytest.raises(ConfigError, match="draft_precision"):
        SpeculativeEngine(streams=str(streams), draft_precision="half", lazy=True)
    eng = SpeculativeEngine(streams=str(streams), draft_precision="exact", lazy=True)
    assert eng.llm_kwargs()["speculative_config"]["draft_precision"] == "exact"
    assert "speculative_config" not in eng.llm_kwargs(speculative=False)
    with pytest.raises(StreamsNotFoundError, match="streams="):
        SpeculativeEngine(model=str(smollm2_dir))  # base model without specstream/ folder
    with pytest.raises(CheckpointError):
        SpeculativeEngine(streams=str(tmp_path / "missing"))


def test_engine_and_deployment_build_the_same_speculative_config(streams, monkeypatch):
    """Our keys are SpecStreamOptions' fields, taken by SpeculativeEngine and DeploymentConfig
    alike; min_draft_prob travels in the speculative config, not in the environment."""
    import inspect

    from specstream_vllm import DeploymentConfig, SpeculativeEngine
    from specstream_vllm.options import OPTION_KEYS
    assert set(OPTION_KEYS) <= set(inspect.signature(SpeculativeEngine).parameters)
    assert set(OPTION_KEYS) <= set(DeploymentConfig.model_fields)
    monkeypatch.delenv("SPECSTREAM_MIN_DRAFT_PROB", raising=False)
    keys = {"min_draft_prob": 0.3, "draft_policy": "auto", "match": "ngram", "match_tokens": 6,
            "draft_precision": "exact"}
    eng = SpeculativeEngine(streams=str(streams), lazy=True, **keys)
    cfg = DeploymentConfig(streams=str(streams), **keys)
    spec = eng.llm_kwargs()["speculative_config"]
    assert spec == cfg.speculative_config() == cfg.llm_kwargs(check_device=False)["speculative_config"]
    assert {k: spec[k] for k in keys} == keys
    argv = cfg.serve_command()
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == spec
    assert "SPECSTREAM_MIN_DRAFT_PROB" not in os.environ
    with pytest.raises(ValueError, match="match"):
        DeploymentConfig(streams=str(streams), match="regex")
    cfg.match = "none"  # validated on assignment too
    assert cfg.speculative_config()["match"] == "none"


def test_missing_match_package_refused_before_the_engine_starts(streams, without_arctic):
    from specstream_vllm import DeploymentConfig, SpeculativeEngine
    with pytest.raises(ConfigError, match="pip install arctic-inference"):
        SpeculativeEngine(streams=str(streams), lazy=True, match="suffix")
    eng = SpeculativeEngine(streams=str(streams), lazy=True, match="none")
    assert eng.llm_kwargs()["speculative_config"]["match"] == "none"
    cfg = DeploymentConfig(streams=str(streams), match="suffix")
    cfg.serve_command()  # rendered for another machine: not checked here
    with pytest.raises(ConfigError, match="pip install arctic-inference"):
        cfg.llm_kwargs(check_device=True)


def test_default_model_needs_streams_when_none_shipped(shipped_streams):
    from specstream_vllm import SpeculativeEngine, StreamsNotFoundError
    if shipped_streams is not None:
        eng = SpeculativeEngine(lazy=True)
        assert eng.streams == str(shipped_streams)
    else:
        with pytest.raises(StreamsNotFoundError, match="pass streams="):
            SpeculativeEngine()


# --------------------------------------------------------------------------- DeploymentConfig

def test_deployment_serve_command_exact(streams, smollm2_dir):
    from specstream_vllm import DeploymentConfig
    cfg = DeploymentConfig(streams=str(streams), gamma=3, max_model_len=2048, max_tokens=256,
                           temperature=0.2, kv_cache_gib=1.5, dtype="bfloat16", port=8123,
                           host="0.0.0.0", served_model_name="smol", enforce_eager=True)
    spec = {"method": "specstream", "num_speculative_tokens": 3, "model": str(streams)}
    assert cfg.serve_command() == [
        "vllm", "serve", str(smollm2_dir), "--host", "0.0.0.0", "--port", "8123",
        "--speculative-config", json.dumps(spec, separators=(",", ":")), "--dtype", "bfloat16",
        "--tensor-parallel-size", "1", "--override-generation-config",
        '{"temperature":0.2,"max_new_tokens":256}', "--max-model-len", "2048",
        "--kv-cache-memory-bytes", str(int(1.5 * 2 ** 30)), "--served-model-name", "smol",
        "--enforce-eager"]
    assert cfg.serve_command(launcher="specstream")[:3] == ["specstream", "vllm", "serve"]
    assert cfg.specstream_serve_command() == ["specstream", "vllm"] + cfg.serve_command()[1:]
    assert cfg.serve_command(launcher="python")[:5] == [sys.executable, "-m", "specstream_vllm.cli",
                                                        "vllm", "serve"]
    kw = cfg.llm_kwargs()
    assert kw["speculative_config"] == spec and kw["model"] == str(smollm2_dir)
    assert kw["kv_cache_memory_bytes"] == int(1.5 * 2 ** 30) and kw["max_model_len"] == 2048
    assert kw["override_generation_config"] == {"temperature": 0.2, "max_new_tokens": 256}
    assert "host" not in kw and "port" not in kw


def test_deployment_finetuned_dir_needs_no_streams(tiny_llama_dir, tmp_path):
    from specstream_vllm import DeploymentConfig
    model = tmp_path / "ft"
    shutil.copytree(tiny_llama_dir, model)
    init_checkpoint(model, model / "specstream", num_streams=4, num_stream_layers=2)
    cfg = DeploymentConfig(model=str(model), gamma=4)
    argv = cfg.serve_command()
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "specstream", "num_speculative_tokens": 4}
    with pytest.raises(ValueError, match="only 4 trained streams"):
        DeploymentConfig(model=str(model), gamma=5)


@pytest.mark.parametrize("kw,msg", [
    ({"gamma": 1}, "greater than or equal to 2"),
    ({"gamma": 9}, "less than or equal to 8"),
    ({"kv_cache_gib": 1, "gpu_memory_utilization": 0.5}, "not both"),
    ({"gpu_memory_utilization": 1.5}, "less than or equal to 1"),
    ({"port": 70000}, "less than or equal to 65535"),
    ({"device": "tpu"}, "'auto', 'cpu' or 'cuda'"),
    ({"dtype": "int8"}, "Input should be"),
    ({"tensor_parallel_size": 0}, "greater than or equal to 1"),
    ({"max_tokens": 600, "max_model_len": 512}, "below max_model_len"),
    ({"tree_depth": 2}, "Extra inputs are not permitted"),
])
def test_deployment_validation(streams, kw, msg):
    from specstream_vllm import DeploymentConfig
    with pytest.raises(ValueError, match=msg):
        DeploymentConfig(streams=str(streams), **kw)


def test_deployment_gamma_above_streams_and_cuda(two_streams):
    from specstream_vllm import DeploymentConfig
    with pytest.raises(ValueError, match="only 2 trained streams"):
        DeploymentConfig(streams=str(two_streams), gamma=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            DeploymentConfig(streams=str(two_streams), gamma=2, device="cuda")


# --------------------------------------------------------------------------- LoRAAdapter (no training)

def test_lora_adapter_validation_and_stats(tmp_path):
    from specstream_vllm import LoRAAdapter, TrainingNotDoneError, TreeDraftingNotSupportedError
    with pytest.raises(ConfigError, match="rank"):
        LoRAAdapter(rank=0, output_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="target modules"):
        LoRAAdapter(target_modules=["nope"], output_dir=str(tmp_path / "b"))
    with pytest.raises(TreeDraftingNotSupportedError):
        LoRAAdapter(tree_depth=2, output_dir=str(tmp_path / "c"))
    ad = LoRAAdapter(rank=8, target_modules=["q_proj", "v_proj"], output_dir=str(tmp_path / "d"))
    st = ad.get_parameter_stats()
    # SmolLM2-135M: 30 layers, q 576->576, v 576->192
    assert st["lora_parameters"] == 30 * 8 * ((576 + 576) + (576 + 192))
    assert st["stream_parameters"] == 4 * 576 and not st["trained"]
    assert 1.3e8 < st["base_parameters"] < 1.4e8
    with pytest.raises(TrainingNotDoneError):
        ad.get_adapted_model()
    with pytest.raises(TrainingNotDoneError):
        ad.save_weights(str(tmp_path / "w"))
    with pytest.raises(CheckpointError, match="save_weights"):
        ad.load_weights(str(tmp_path))
    with pytest.raises(ConfigError, match="unsupported form"):
        ad._examples([42])


# --------------------------------------------------------------------------- one real engine

@pytest.fixture(scope="module")
def engine(streams):
    from specstream_vllm import SpeculativeEngine
    # fixed policy: these tests count drafts, and "auto" may rightly draft none on a slow,
    # busy machine where verification costs more than the streams' drafts save
    eng = SpeculativeEngine(streams=str(streams), gamma=4, dtype="float32", enforce_eager=True,
                            max_model_len=1024, draft_policy="fixed")
    yield eng
    eng.shutdown()


def _raw_counters(llm) -> dict:
    """vLLM's counters read directly (independent of specstream_vllm.api.results)."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            v = getattr(m, "values", None)
            out[m.name] = list(v) if v is not None else m.value
    return out


@pytest.mark.vllm
def test_generate_string(engine):
    r = engine.generate("What is the capital of France?", max_new_tokens=24)
    assert not r.batched and len(r.texts) == 1 and r.text.strip()
    assert 0 < len(r.token_ids[0]) <= 24 and r.num_generated_tokens == len(r.token_ids[0])
    assert r.tokens_per_second > 0 and r.seconds > 0
    assert "Paris" in r.text
    assert r.acceptance.num_drafts > 0 and r.mean_acceptance_length >= 1


@pytest.mark.vllm
def test_generate_list_and_chat(engine):
    r = engine.generate(["Write a haiku about autumn.", "What does HTTP stand for?"],
                        max_new_tokens=16, temperature=0.8, top_p=0.9, seed=1)
    assert r.batched and len(r.texts) == 2 and all(len(t) > 0 for t in r.token_ids)
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a primary color."}]
    c = engine.generate(chat, max_new_tokens=16)
    assert not c.batched and c.text.strip()
    cs = engine.generate([chat, [{"role": "user", "content": "Hi!"}]], max_new_tokens=8)
    assert cs.batched and len(cs.texts) == 2
    # the same conversation as messages and as a plain string with chat_template: identical prompt
    s = engine.generate("Name a primary color.", max_new_tokens=4)
    m = engine.generate([{"role": "user", "content": "Name a primary color."}], max_new_tokens=4)
    assert s.prompt_token_ids == m.prompt_token_ids
    raw = engine.generate("Name a primary color.", max_new_tokens=4, chat_template=False)
    assert len(raw.prompt_token_ids[0]) < len(s.prompt_token_ids[0])
    with pytest.raises(ConfigError):
        engine.generate([], max_new_tokens=4)
    with pytest.raises(SpecStreamError, match="not supported"):
        engine.generate("x", tree_width=2)


@pytest.mark.vllm
def test_metrics_are_deltas_of_vllm_counters(engine):
    before_raw = _raw_counters(engine.llm)
    before = engine.get_metrics()
    r = engine.generate(["Explain what a binary search does.", "List three uses of a paperclip."],
                        max_new_tokens=32)
    after_raw = _raw_counters(engine.llm)
    after = engine.get_metrics()
    d = r.acceptance
    assert d.num_drafts == after_raw["vllm:spec_decode_num_drafts"] - before_raw["vllm:spec_decode_num_drafts"]
    assert d.num_accepted_tokens == (after_raw["vllm:spec_decode_num_accepted_tokens"]
                                     - before_raw["vllm:spec_decode_num_accepted_tokens"])
    assert d.num_draft_tokens == (after_raw["vllm:spec_decode_num_draft_tokens"]
                                  - before_raw["vllm:spec_decode_num_draft_tokens"])
    assert d.accepted_per_position == [a - b for a, b in zip(
        after_raw["vllm:spec_decode_num_accepted_tokens_per_pos"],
        before_raw["vllm:spec_decode_num_accepted_tokens_per_pos"])]
    # vLLM verifies up to k tokens per draft: 4 streams, suffix matches up to 8 (k = 8)
    k = len(after_raw["vllm:spec_decode_num_accepted_tokens_per_pos"])
    assert k == 8 and d.num_drafts > 0 and d.num_draft_tokens <= k * d.num_drafts
    assert sum(d.accepted_per_position) == d.num_accepted_tokens
    assert math.isclose(d.mean_acceptance_length, 1 + d.num_accepted_tokens / d.num_drafts)
    # running totals move by exactly this call
    assert after.num_drafts - before.num_drafts == d.num_drafts
    assert after.num_accepted_tokens - before.num_accepted_tokens == d.num_accepted_tokens
    assert after.total_generated_tokens - before.total_generated_tokens == r.num_generated_tokens
    assert after.num_requests - before.num_requests == 2
    assert after.total_seconds > before.total_seconds
    # this process started no other engine: totals equal vLLM's absolute counters
    assert after.num_drafts == after_raw["vllm:spec_decode_num_drafts"]


@pytest.mark.vllm
def test_benchmark_greedy_equals_no_speculation(engine, tmp_path):
    """float32 greedy: specstream output is token-identical to vLLM without speculation."""
    res = engine.benchmark(["Why is the sky blue? Answer in two sentences."], num_runs=1,
                           max_new_tokens=32, workdir=str(tmp_path))
    assert len(res.speculative_token_ids[0]) > 1
    assert res.speculative_token_ids == res.baseline_token_ids and res.identical_outputs == 1
    assert res.speculative_tokens_per_second > 0 and res.baseline_tokens_per_second > 0
    assert math.isclose(res.speedup, res.speculative_tokens_per_second / res.baseline_tokens_per_second)
    # streams 4, suffix matches up to 8: vLLM verifies and counts up to 8 positions
    assert res.acceptance.num_drafts > 0 and len(res.per_position_acceptance) == 8
    m = res.memory
    from safetensors import safe_open
    with safe_open(str(Path(engine.streams) / "model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert m.stream_parameter_bytes == numel * 4  # float32 engine
    assert m.speculative_engine_rss_bytes > 2 ** 27 and m.baseline_engine_rss_bytes > 2 ** 27
    assert m.rss_overhead_bytes == m.speculative_engine_rss_bytes - m.baseline_engine_rss_bytes
    json.dumps(res.to_dict())  # serializable report
    assert "speedup" in res.summary()


def test_shutdown_is_final(streams):
    from specstream_vllm import EngineClosedError, SpeculativeEngine
    eng = SpeculativeEngine(streams=str(streams), lazy=True)
    eng.shutdown()
    with pytest.raises(EngineClosedError):
        eng.generate("x")
