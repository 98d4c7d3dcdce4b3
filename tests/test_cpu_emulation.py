"""scripts/emulate_cpu.py: a command's processes take an older CPU kind's code paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specstream_vllm.hardware import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import emulate_cpu  # noqa: E402

AMX_HOST = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 "
            "avx_vnni amx_bf16 amx_tile amx_int8\n")

PROBE = """
import json, torch
from vllm.platforms import current_platform
from specstream_vllm import hardware
current_platform.import_kernels()
maps = open("/proc/self/maps").read()
print(json.dumps({"avx512": torch.cpu._is_avx512_supported(),
                  "amx": torch.cpu._is_amx_tile_supported(),
                  "aten": torch.backends.cpu.get_cpu_capability(),
                  "kind": hardware.cpu_kind(),
                  "vllm_lib": sorted({l.rsplit("/", 1)[-1] for l in maps.splitlines()
                                      if "/vllm/_C" in l})}))
"""


@pytest.mark.parametrize("kind, left", [
    ("avx2", "fpu sse2 avx avx2 fma"),
    ("avx512_bf16", "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni"),
    ("avx512", "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni")])
def test_cpuinfo_loses_the_flags_the_kind_lacks(kind, left):
    text = emulate_cpu.cpuinfo_without(AMX_HOST, emulate_cpu.KINDS[kind][0])
    flags = [line for line in text.splitlines() if line.startswith("flags")][0]
    assert flags.split(":", 1)[1].split() == left.split()
    assert "model name\t: Intel(R) Xeon(R) Processor" in text


@pytest.mark.parametrize("kind, avx512, aten, lib", [
    ("avx2", False, "AVX2", "_C_AVX2.abi3.so"),
    ("avx512", True, "AVX512", "_C_AVX512.abi3.so")])
def test_an_emulated_process_loads_the_kinds_vllm_kernels_and_reads_its_flags(kind, avx512, aten,
                                                                              lib):
    host = cpu_flags()
    if "avx512f" not in host or (kind == "avx512" and "avx512_bf16" not in host):
        pytest.skip(f"needs a host with more than {kind} to step down from")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "emulate_cpu.py"), kind, "--",
                          sys.executable, "-c", PROBE],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["avx512"] is avx512 and got["amx"] is False
    assert got["aten"] == aten and got["kind"] == kind
    assert got["vllm_lib"] == [lib], got


#: vLLM's vocabulary-parallel masking (compiled by Inductor, integer lanes): every
#: tensor-parallel engine runs it on its token ids
MASKED_IDS = """
import json, torch
from vllm.model_executor.layers.vocab_parallel_embedding import get_masked_input_and_mask
ids = torch.arange(0, 49152, 7, dtype=torch.long)
lo, hi = 24576, 49152
got, _ = get_masked_input_and_mask(ids, lo, hi, 0, hi, hi)
want = torch.where((ids >= lo) & (ids < hi), ids - lo, 0)
print(json.dumps({"equal": bool(torch.equal(got, want)), "max": int(got.max())}))
"""


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="needs an AVX-512 host to step down from")
def test_an_emulated_process_does_not_reuse_the_hosts_compiled_graphs(tmp_path):
    """A graph the host compiled and cached must not run in an emulated AVX2 process: its
    loops assume the host's vector width (wrong ids, then an IndexError in the embedding)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               VLLM_CACHE_ROOT=str(tmp_path / "vllm"))

    def masked(prefix):
        out = subprocess.run(prefix + [sys.executable, "-c", MASKED_IDS], capture_output=True,
                             text=True, timeout=300, cwd=ROOT, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert masked([])["equal"]                  # the host compiles and caches the graph
    got = masked([sys.executable, str(ROOT / "scripts" / "emulate_cpu.py"), "avx2", "--"])
    assert got["equal"], got
    assert (tmp_path / "inductor-emulated-avx2").is_dir()


def test_compile_caches_sit_beside_the_hosts_per_kind():
    env = {"TORCHINDUCTOR_CACHE_DIR": "/c/inductor/", "XDG_CACHE_HOME": "/x"}
    assert emulate_cpu.compile_caches("avx2", env) == {
        "TORCHINDUCTOR_CACHE_DIR": "/c/inductor-emulated-avx2",
        "VLLM_CACHE_ROOT": "/x/vllm-emulated-avx2"}


def test_usage_error_names_the_kinds():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "emulate_cpu.py"), "avx"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "avx2,avx512_bf16,avx512" in out.stderr
