"""Model registry: the MSA architectures (``SpecStream<Base>ForCausalLM``) that serve a
stream checkpoint, registered lazily by module path (model_patches/)."""
from __future__ import annotations

VLLM_SYMBOLS = (
    "vllm:ModelRegistry.register_model",
    "vllm:ModelRegistry.get_supported_archs",
)


def apply() -> None:
    from vllm import ModelRegistry

    from specstream_vllm.model_patches import MSA_ARCHITECTURES
    supported = set(ModelRegistry.get_supported_archs())
    for _, (name, path) in MSA_ARCHITECTURES.items():
        if name not in supported:
            ModelRegistry.register_model(name, path)
