"""The trainer's device, its training record, data parallel runs (torchrun, gloo on the CPU)
and, where a GPU exists, CUDA training (``pytest -m cuda``)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specstream_vllm.checkpoint import load_checkpoint
from specstream_vllm.errors import ConfigError
from specstream_vllm.training.recipe import load_recipe
from tests.test_training import _examples, tiny_model  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train_tiny_test.yaml"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _recipe(tmp_path: Path, model_dir: Path, **over):
    return load_recipe(TINY, {"base_model": str(model_dir), "output_dir": str(tmp_path / "run"), **over})


def _log_losses(out_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out_dir / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- device choice

def test_auto_resolves_to_cuda_only_where_cuda_exists():
    from specstream_vllm.training.device import base_dtype, resolve_device
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert base_dtype("auto", torch.device("cpu")) == torch.float32
    assert base_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert base_dtype("float32", torch.device("cuda", 0)) == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_cuda_without_cuda_is_refused_with_a_way_out(tmp_path, tiny_model):
    from specstream_vllm.training.trainer import train
    with pytest.raises(ConfigError) as e:
        train(_recipe(tmp_path, tiny_model, device="cuda", max_steps=1), _examples(),
              progress=False, log=lambda s: None)
    assert "CUDA is not available" in str(e.value) and "--device cpu" in str(e.value)
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_unknown_device_names_are_refused_at_the_recipe():
    with pytest.raises(ConfigError, match="device") as e:
        load_recipe(TINY, {"device": "gpu"})
    assert "cuda:N" in str(e.value)
    assert load_recipe(TINY, {"device": "cuda:1"}).device == "cuda:1"


def test_cli_device_flag_sets_the_recipe():
    import argparse
    from specstream_vllm.training.cli import _recipe as cli_recipe, add_train_parser
    ap = argparse.ArgumentParser()
    add_train_parser(ap.add_subparsers(dest="cmd"))
    assert cli_recipe(ap.parse_args(["train", "--recipe", str(TINY), "--device", "cpu"])).device == "cpu"
    assert cli_recipe(ap.parse_args(["train", "--recipe", str(TINY), "--device", "auto"])).device == "auto"
    assert load_recipe(None).device == "auto" and load_recipe(TINY).device == "cpu"


def test_weights_are_counted_from_the_file_headers(tiny_model):
    from transformers import AutoModelForCausalLM
    from specstream_vllm.training.device import count_weights
    m = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    stored = {id(p) for p in m.parameters()}  # tied embeddings are stored once
    assert count_weights(tiny_model) == sum(p.numel() for p in m.parameters() if id(p) in stored)


# --------------------------------------------------------------------------- the step loop on CPU

def test_cpu_run_records_device_tokens_and_time(tmp_path, tiny_model):
    from specstream_vllm.training.trainer import train
    res = train(_recipe(tmp_path, tiny_model, device="cpu", max_steps=6), _examples(),
                progress=False, log=lambda s: None)
    rec = load_checkpoint(res.checkpoint_dir)[0].training
    assert rec["device"].startswith("cpu") and rec["world_size"] == 1 and rec["base_dtype"] == "float32"
    assert rec["tokens"] == res.tokens > 0 and rec["seconds"] > 0 and rec["tokens_per_second"] > 0
    assert rec["peak_memory_gib"] > 0
    # tokens: every sequence of every step (4 per step), counted exactly
    assert res.tokens > 6 * 4 * 30


def test_log_interval_does_not_change_the_per_step_log(tmp_path, tiny_model):
    """Losses stay on the device between log intervals; the log still has every step."""
    from specstream_vllm.training.trainer import train
    runs = {}
    for every in (1, 4):
        r = _recipe(tmp_path / str(every), tiny_model, device="cpu", max_steps=7, log_every=every)
        res = train(r, _examples(), progress=False, log=lambda s: None)
        runs[every] = _log_losses(Path(r.output_dir))
        assert [h["step"] for h in res.history] == [s for s in range(1, 8) if s % every == 0 or s == 7]
    assert len(runs[1]) == 7 and runs[1] == runs[4]


def test_training_modules_import_each_other_without_circles():
    pkg = ROOT / "specstream_vllm" / "training"
    deps = {}
    for f in pkg.glob("*.py"):
        deps[f.stem] = {n.module.split(".")[0] for n in ast.walk(ast.parse(f.read_text()))
                        if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}

    def walk(mod, path):
        for m in deps.get(mod, ()):
            assert m not in path, f"import circle: {' -> '.join(path + [m])}"
            walk(m, path + [m])
    for mod in deps:
        walk(mod, [mod])


# --------------------------------------------------------------------------- data parallel

_DDP_SCRIPT = """
import json, os, sys, torch
from pathlib import Path
from specstream_vllm.training.data import Example
from specstream_vllm.training.recipe import load_recipe
from specstream_vllm.training.trainer import train
model, out, tiny = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
exs = [Example.from_json(l) for l in (out.parent / "examples.jsonl").read_text().splitlines()]
r = load_recipe(tiny, {"base_model": model, "output_dir": str(out), "device": "cpu",
                       "max_steps": 4, "checkpoint_every": 2, "log_every": 2, "batch_size": 2})
res = train(r, exs, progress=False, log=print)
torch.save(res.params.state_tensors(), out.parent / f"rank{os.environ['RANK']}.pt")
"""


def test_torchrun_two_cpu_processes_train_one_set_of_streams(tmp_path, tiny_model):
    """DDP over gloo: both ranks end with the same streams, rank 0 alone writes, and the
    checkpoint is the single-process format with the tokens of both ranks."""
    (tmp_path / "examples.jsonl").write_text("\n".join(e.to_json() for e in _examples()) + "\n")
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(script), str(tiny_model), str(out), str(TINY)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    cfg, tensors = load_checkpoint(out, base_model_dir=tiny_model)
    assert all(torch.equal(tensors[k], r0[k].float()) for k in tensors)
    assert cfg.training["world_size"] == 2 and cfg.training["steps"] == 4
    steps = [json.loads(l)["step"] for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer
    # each rank ran its own 2 sequences a step: the record counts both ranks' tokens
    assert cfg.training["tokens"] > 4 * 2 * 2 * 30
    assert p.stdout.count("[train] done") == 1
    print(f"torchrun run: {time.time() - t0:.1f} s")


def test_torchrun_refuses_finetuned_mode(monkeypatch, tmp_path, tiny_model):
    from specstream_vllm.training.trainer import train
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="lossless streams only"):
        train(_recipe(tmp_path, tiny_model, mode="finetuned", loss={"alpha0": 1.0}), _examples(),
              progress=False, log=lambda s: None)


# --------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@needs_cuda
def test_cuda_training_loss_falls_and_the_checkpoint_loads_on_cpu(tmp_path, tiny_model):
    from specstream_vllm.reference.streams import StreamParams
    from specstream_vllm.training.device import load_base_model
    from specstream_vllm.training.trainer import train
    r = _recipe(tmp_path, tiny_model, device="cuda", epochs=6, lr=3e-2)
    res = train(r, _examples(), progress=False, log=lambda s: None)
    losses = _log_losses(Path(r.output_dir))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    cfg, tensors = load_checkpoint(res.checkpoint_dir, base_model_dir=tiny_model)
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert cfg.training["device"].startswith("cuda") and cfg.training["base_dtype"] == "bfloat16"
    assert cfg.training["peak_memory_gib"] > 0 and cfg.training["tokens"] > 0
    model = load_base_model(tiny_model, torch.float32)
    params = StreamParams.from_checkpoint(model.config, cfg, tensors)
    assert params.stream_embeddings.dtype == torch.float32


@pytest.mark.cuda
@needs_cuda
def test_cuda_refuses_a_model_larger_than_the_gpu(tmp_path, tiny_model, monkeypatch):
    from specstream_vllm.training import device
    from specstream_vllm.training.trainer import train
    monkeypatch.setattr(device, "FIT_FRACTION", 1e-9)  # the tiny model then counts as too large
    with pytest.raises(ConfigError, match="FSDP"):
        train(_recipe(tmp_path, tiny_model, device="cuda", max_steps=1), _examples(),
              progress=False, log=lambda s: None)
