"""Each example in examples/ runs end to end with --quick (real vLLM engines, one at a time)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_vllm_integration import streams_for_smollm2

pytestmark = pytest.mark.vllm
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def streams_args(smollm2_dir, shipped_streams, tmp_path_factory) -> list[str]:
    """No flag when streams are shipped; otherwise an untrained checkpoint (smoke run)."""
    if shipped_streams is not None:
        return []
    return ["--streams", str(streams_for_smollm2(smollm2_dir, None, tmp_path_factory.mktemp("ex")))]


def _run(args: list[str], timeout: float = 600) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                         cwd=EXAMPLES.parent)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


def test_quickstart(streams_args):
    out = _run([str(EXAMPLES / "quickstart.py"), "--quick", *streams_args])
    assert "Paris" in out and "tok/s" in out and "mean acceptance length" in out


def test_basic_usage(streams_args):
    out = _run([str(EXAMPLES / "basic_usage.py"), "--quick", *streams_args])
    assert "not supported yet" in out
    assert "speedup" in out and "greedy outputs identical: 1/1" in out
    assert "serve" in out and "--speculative-config" in out


def test_lora_finetuning(tmp_path):
    out = _run([str(EXAMPLES / "lora_finetuning.py"), "--quick", "--out", str(tmp_path)])
    assert "trained 2 steps" in out and "servable model:" in out
    assert (tmp_path / "restored" / "model" / "specstream" / "config.json").is_file()
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert "mean acceptance length" in out
