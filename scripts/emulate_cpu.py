"""Run a command as if this x86 CPU were an older kind: ``avx2`` (no AVX-512, no AMX),
``avx512`` (AVX-512 without bf16) or ``avx512_bf16`` (AVX-512 with bf16, no AMX).

    python scripts/emulate_cpu.py avx2 -- bash scripts/test.sh
    python scripts/emulate_cpu.py avx512_bf16 -- specstream check-dtype

vLLM-CPU's bfloat16 faults depend on the CPU kind (specstream_vllm/hardware.py), and a
maintainer rarely has every kind at hand. On a newer CPU this takes, in every process of
the command, the code paths an older one takes:

* PyTorch's ISA probes (``torch.cpu._is_avx512_supported`` and the rest) answer False for
  what the kind lacks, so vLLM-CPU loads the kernel library built for it (``_C_AVX2`` on
  ``avx2``, ``_C_AVX512`` on ``avx512``) and picks its attention and GEMM paths as on such a CPU;
* ``ATEN_CPU_CAPABILITY``: PyTorch's own kernels and Inductor's generated code use that ISA;
* ``ONEDNN_MAX_CPU_ISA``: oneDNN's kernels stop at it;
* ``SPECSTREAM_CPUINFO``: this plugin reads a copy of /proc/cpuinfo without the missing flags;
* ``TORCHINDUCTOR_CACHE_DIR`` and ``VLLM_CACHE_ROOT``: compile caches of the kind's own, beside
  the host's. PyTorch's FX graph cache does not key on the vector ISA: a graph compiled by a
  native AVX-512 process and read back by an AVX2 one keeps 16-lane loops over 8-lane vectors
  and returns wrong integers (vLLM's vocabulary-parallel embedding then fails with
  ``IndexError: index out of range in self`` in every tensor-parallel engine).

What it cannot change: code that asks the CPU itself (CPUID) instead of these probes, and
speed (timings stay this CPU's). It runs the older kind's software, not its silicon.
"""
from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: kind -> (flags removed (regex), torch.cpu probes answering False, ATen ISA, oneDNN ISA)
KINDS = {
    "avx2": (r"avx512\w*|amx\w*|avx_vnni\w*|avx_ifma|avx_ne_convert",
             ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
              "_is_amx_tile_supported", "_is_amx_fp16_supported"),
             "avx2", "AVX2"),
    "avx512_bf16": (r"amx\w*", ("_is_amx_tile_supported", "_is_amx_fp16_supported"),
                    "avx512", "AVX512_CORE_BF16"),
    # a Cascade Lake / Ice Lake Xeon: AVX-512 with VNNI, no bf16 (vLLM-CPU's _C_AVX512)
    "avx512": (r"avx512_bf16|avx512_fp16|amx\w*|avx_vnni\w*|avx_ne_convert",
               ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"),
               "avx512", "AVX512_CORE_VNNI"),
}

# Runs at the start of every Python process of the command (PYTHONPATH): patches
# torch.cpu's probes the moment torch.cpu is first imported, before anyone reads them,
# without importing torch in processes that never do.
SITECUSTOMIZE = '''\
import importlib.abc
import importlib.machinery
import sys

_FALSE = {probes!r}


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for probe in _FALSE:
                if hasattr(module, probe):
                    setattr(module, probe, lambda: False)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchTorchCpu())
'''


def cpuinfo_without(text: str, drop: str) -> str:
    """``text`` (of /proc/cpuinfo) with every flag matching ``drop`` removed."""
    pattern = re.compile(rf"(?:{drop})")
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "flags":
            line = f"{key}: " + " ".join(f for f in value.split() if not pattern.fullmatch(f))
        out.append(line)
    return "\n".join(out) + "\n"


def compile_caches(kind: str, env: dict[str, str]) -> dict[str, str]:
    """Inductor's and vLLM's cache directories for ``kind``: siblings of the ones ``env``
    (or PyTorch's and vLLM's defaults) names, kept between runs so an emulated run is warm
    the second time, and apart from the host's so no compiled graph crosses ISAs."""
    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    inductor = env.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(),
                                                                  f"torchinductor_{user}")
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    vllm = env.get("VLLM_CACHE_ROOT") or os.path.join(xdg, "vllm")
    return {"TORCHINDUCTOR_CACHE_DIR": f"{inductor.rstrip('/')}-emulated-{kind}",
            "VLLM_CACHE_ROOT": f"{vllm.rstrip('/')}-emulated-{kind}"}


def emulation_env(kind: str, workdir: Path, cpuinfo: str, env: dict[str, str]) -> dict[str, str]:
    """The environment that runs a command as ``kind`` (files written to ``workdir``)."""
    drop, probes, aten, onednn = KINDS[kind]
    (workdir / "cpuinfo").write_text(cpuinfo_without(cpuinfo, drop))
    (workdir / "sitecustomize.py").write_text(SITECUSTOMIZE.format(probes=probes))
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir), env.get("PYTHONPATH")) if p)
    out.update(ATEN_CPU_CAPABILITY=aten, ONEDNN_MAX_CPU_ISA=onednn,
               SPECSTREAM_CPUINFO=str(workdir / "cpuinfo"))
    out.update(compile_caches(kind, env))
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in KINDS or argv[1] != "--":
        print(f"usage: python scripts/emulate_cpu.py {{{','.join(KINDS)}}} -- COMMAND [ARGS...]",
              file=sys.stderr)
        return 2
    kind, cmd = argv[0], argv[2:]
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    if "avx2" not in text.split():
        print("emulate_cpu: this CPU has no AVX2; it cannot run as an older x86 kind",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix=f"emulate-{kind}-") as tmp:
        env = emulation_env(kind, Path(tmp), text, dict(os.environ))
        print(f"emulate_cpu: running as a {kind} CPU: {' '.join(cmd)}", file=sys.stderr)
        return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
