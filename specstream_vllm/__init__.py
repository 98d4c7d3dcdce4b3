"""specstream-vllm: Speculative Streaming (arXiv 2402.11131) as a vLLM speculative method.

The Python API (``SpeculativeEngine``, ``LoRAAdapter``, ``DeploymentConfig``, ...) is
exported lazily: ``import specstream_vllm`` imports neither torch nor vLLM.
"""

__version__ = "0.1.0"
METHOD = "specstream"

_API = ("SpeculativeEngine", "LoRAAdapter", "DeploymentConfig", "GenerationResult",
        "BenchmarkResult", "EngineMetrics", "AcceptanceStats", "MemoryOverhead",
        "TreeDraftingNotSupportedError", "DeviceError", "StreamsNotFoundError",
        "EngineClosedError", "TrainingNotDoneError", "SamplingParameterNotSupportedError")
__all__ = ["METHOD", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api
        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
