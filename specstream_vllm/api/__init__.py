"""The SpecStream Python API: :class:`SpeculativeEngine`, :class:`LoRAAdapter`,
:class:`DeploymentConfig`. Names are imported lazily so ``import specstream_vllm`` stays cheap."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SpeculativeEngine": ".engine",
    "GenerationResult": ".results",
    "BenchmarkResult": ".results",
    "EngineMetrics": ".results",
    "AcceptanceStats": ".results",
    "MemoryOverhead": ".results",
    "LoRAAdapter": ".lora",
    "DeploymentConfig": ".deploy",
    "TreeDraftingNotSupportedError": ".errors",
    "DeviceError": ".errors",
    "StreamsNotFoundError": ".errors",
    "EngineClosedError": ".errors",
    "TrainingNotDoneError": ".errors",
    "SamplingParameterNotSupportedError": ".errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
