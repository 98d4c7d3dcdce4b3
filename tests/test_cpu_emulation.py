"""scripts/emulate_cpu.py: a command's processes take an older CPU kind's code paths."""
from __future__ import annotations

import json
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
    ("avx512_bf16", "fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni")])
def test_cpuinfo_loses_the_flags_the_kind_lacks(kind, left):
    text = emulate_cpu.cpuinfo_without(AMX_HOST, emulate_cpu.KINDS[kind][0])
    flags = [line for line in text.splitlines() if line.startswith("flags")][0]
    assert flags.split(":", 1)[1].split() == left.split()
    assert "model name\t: Intel(R) Xeon(R) Processor" in text


@pytest.mark.skipif("avx512f" not in cpu_flags(), reason="needs an AVX-512 host to step down from")
def test_an_emulated_avx2_process_loads_vllms_avx2_kernels_and_reads_avx2_flags():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "emulate_cpu.py"), "avx2", "--",
                          sys.executable, "-c", PROBE],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["avx512"] is False and got["amx"] is False
    assert got["aten"] == "AVX2" and got["kind"] == "avx2"
    assert got["vllm_lib"] == ["_C_AVX2.abi3.so"], got


def test_usage_error_names_the_kinds():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "emulate_cpu.py"), "avx"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "avx2,avx512_bf16" in out.stderr
