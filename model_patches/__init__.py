"""Per-architecture Multi-Stream Attention model code for vLLM.

Shipped inside the package as ``specstream_vllm.model_patches`` (see pyproject).
This module stays import-light: the vLLM model classes are registered lazily by
``module:Class`` strings, so loading the plugin does not import vLLM's models.
"""

_FAMILY = "specstream_vllm.model_patches.llama_family"

#: served base architecture -> (MSA architecture registered with vLLM, "module:Class")
MSA_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("SpecStreamLlamaForCausalLM", f"{_FAMILY}:SpecStreamLlamaForCausalLM"),
    "MistralForCausalLM": ("SpecStreamMistralForCausalLM", f"{_FAMILY}:SpecStreamMistralForCausalLM"),
    "Qwen2ForCausalLM": ("SpecStreamQwen2ForCausalLM", f"{_FAMILY}:SpecStreamQwen2ForCausalLM"),
}
