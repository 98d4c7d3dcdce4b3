"""Per-architecture Multi-Stream Attention model code for vLLM.

Shipped inside the package as ``specstream_vllm.model_patches`` (see pyproject).
This module stays import-light: the vLLM model classes are registered lazily by
``module:Class`` strings, so loading the plugin does not import vLLM's models.
One mechanism (``stream_layers.py``) serves every family; a family module holds its
``Layout`` and one class per served architecture.
"""

_PKG = "specstream_vllm.model_patches"


def _entry(arch: str, module: str) -> tuple[str, str]:
    name = f"SpecStream{arch}"
    return name, f"{_PKG}.{module}:{name}"


#: served base architecture -> (MSA architecture registered with vLLM, "module:Class")
MSA_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": _entry("LlamaForCausalLM", "llama_family"),
    "MistralForCausalLM": _entry("MistralForCausalLM", "llama_family"),
    "Qwen2ForCausalLM": _entry("Qwen2ForCausalLM", "llama_family"),
    "Qwen3ForCausalLM": _entry("Qwen3ForCausalLM", "llama_family"),
    "GPT2LMHeadModel": _entry("GPT2LMHeadModel", "gpt2"),
    "OPTForCausalLM": _entry("OPTForCausalLM", "opt"),
    "BloomForCausalLM": _entry("BloomForCausalLM", "bloom"),
    "PhiForCausalLM": _entry("PhiForCausalLM", "phi"),
}


#: served architectures whose verification forward can carry the stream rows
#: (``draft_pass: fused``): vLLM's Llama-family decoder loop (stream_layers.StreamModel)
FUSED_PASS_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM",
                                      "Qwen2ForCausalLM", "Qwen3ForCausalLM"})
