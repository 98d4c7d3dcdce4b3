"""What differs between the base-model families specstream supports, in one table.

Everything here is plain data read from a model's ``config.json`` (dict or HF config
object): the dimensions under each family's own key names, which canonical stream-LoRA
targets a family has, how positions enter its layers, and which weights identify it.
The reference model (``reference/hf_layers.py``) and the vLLM models (``model_patches/``)
hold the module-level code; both name LoRA targets by the canonical Llama names:

==========  ===================  ======================  ==================  ==========
family      q/k/v                o_proj                  up_proj / down_proj gate_proj
==========  ===================  ======================  ==================  ==========
llama       q_proj, k_proj, ...  o_proj                  up_proj, down_proj  gate_proj
gpt2        slices of c_attn     attn.c_proj             mlp.c_fc / c_proj   --
opt         q_proj, k_proj, ...  out_proj                fc1 / fc2           --
bloom       per-head slices of   dense                   dense_h_to_4h /     --
            query_key_value                              dense_4h_to_h
phi         q_proj, k_proj, ...  dense                   fc1 / fc2           --
==========  ===================  ======================  ==================  ==========
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UnsupportedArchitectureError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_UNGATED = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    #: how positions enter the decoder layers: rotary at each query/key, ALiBi biases in
    #: the attention scores, or nowhere (learned absolute embeddings added at the input:
    #: the streams then inherit the anchor's position through h_t)
    positions: Literal["rope", "alibi", "learned"]
    lora_targets: tuple[str, ...]
    #: HF module names a peft LoRA (fine-tuned mode) uses for each canonical target
    peft_modules: dict[str, str]
    #: safetensors names whose first rows enter the base-model fingerprint ({last} = L - 1)
    fingerprint_probes: tuple[str, ...]


_LLAMA_PROBES = ("model.embed_tokens.weight", "model.layers.{last}.self_attn.o_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight")
_IDENTITY = {t: t for t in LORA_TARGETS}

LLAMA = Family("llama", "rope", LORA_TARGETS, _IDENTITY, _LLAMA_PROBES)
GPT2 = Family("gpt2", "learned", _UNGATED,
              {"q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "attn.c_proj",
               "up_proj": "c_fc", "down_proj": "mlp.c_proj"},
              ("transformer.wte.weight", "wte.weight", "transformer.h.{last}.attn.c_proj.weight",
               "h.{last}.attn.c_proj.weight"))
OPT = Family("opt", "learned", _UNGATED,
             {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj",
              "up_proj": "fc1", "down_proj": "fc2"},
             ("model.decoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "model.decoder.layers.{last}.self_attn.out_proj.weight"))
BLOOM = Family("bloom", "alibi", _UNGATED,
               {"q_proj": "query_key_value", "k_proj": "query_key_value",
                "v_proj": "query_key_value", "o_proj": "self_attention.dense",
                "up_proj": "dense_h_to_4h", "down_proj": "dense_4h_to_h"},
               ("transformer.word_embeddings.weight", "word_embeddings.weight",
                "transformer.h.{last}.self_attention.dense.weight", "h.{last}.self_attention.dense.weight"))
PHI = Family("phi", "rope", _UNGATED,
             {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "dense",
              "up_proj": "fc1", "down_proj": "fc2"},
             ("model.embed_tokens.weight", "model.layers.{last}.self_attn.dense.weight"))

#: HF architecture -> family, for every architecture with a reference implementation
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA, "Qwen2ForCausalLM": LLAMA,
    "Qwen3ForCausalLM": LLAMA, "GPT2LMHeadModel": GPT2, "OPTForCausalLM": OPT,
    "BloomForCausalLM": BLOOM, "PhiForCausalLM": PHI,
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def architecture_of(config) -> str:
    archs = _get(config, "architectures") or ["?"]
    return archs[0]


def family_of(config, arch: str | None = None) -> Family:
    """The family of an HF config (object or ``config.json`` dict); a clear error if none.
    ``arch`` overrides the config's ``architectures`` (models built in code have none)."""
    arch = arch or architecture_of(config)
    fam = FAMILIES.get(arch)
    if fam is None:
        raise UnsupportedArchitectureError(
            f"architecture {arch} has no Multi-Stream Attention implementation; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    check_variant(config, arch)
    return fam


def check_variant(config, arch: str | None = None) -> None:
    """Refuse configurations of a supported family that the stream code does not model."""
    arch = arch or architecture_of(config)
    if arch == "OPTForCausalLM":
        if _get(config, "do_layer_norm_before") is False:
            raise UnsupportedArchitectureError(
                "post-layer-norm OPT models (do_layer_norm_before=false, e.g. opt-350m) are not "
                "supported; pre-LN OPT models (opt-125m, opt-1.3b and larger) are")
        wpd = _get(config, "word_embed_proj_dim")
        if wpd is not None and wpd != _get(config, "hidden_size"):
            raise UnsupportedArchitectureError(
                f"OPT models with word_embed_proj_dim ({wpd}) != hidden_size (project_in/out) "
                "are not supported")
    if arch == "GPT2LMHeadModel":
        if _get(config, "scale_attn_by_inverse_layer_idx") or _get(config, "reorder_and_upcast_attn"):
            raise UnsupportedArchitectureError(
                "GPT-2 models with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are "
                "not supported (vLLM refuses them too)")
        if _get(config, "scale_attn_weights") is False:
            raise UnsupportedArchitectureError("GPT-2 models with scale_attn_weights=false are not "
                                               "supported")
    if arch == "BloomForCausalLM" and _get(config, "apply_residual_connection_post_layernorm"):
        raise UnsupportedArchitectureError(
            "BLOOM models with apply_residual_connection_post_layernorm=true are not supported")


def check_lora_targets(config, targets) -> None:
    fam = family_of(config)
    bad = [t for t in targets if t not in fam.lora_targets]
    if bad:
        raise ValueError(f"LoRA targets {bad} do not exist in a {architecture_of(config)} "
                         f"({fam.name} family); choose from {list(fam.lora_targets)}")


@dataclass(frozen=True)
class Dims:
    """A decoder's dimensions under canonical names, whatever its config calls them."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


def _get(config, key):
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _first(config, *keys):
    for k in keys:
        v = _get(config, k)
        if v is not None:
            return v
    return None


def dims_of(config) -> Dims:
    d = _first(config, "hidden_size", "n_embd", "d_model")
    H = _first(config, "num_attention_heads", "n_head")
    arch = architecture_of(config)
    if arch == "GPT2LMHeadModel":
        inter = _get(config, "n_inner") or 4 * d
    elif arch == "BloomForCausalLM":
        inter = 4 * d
    else:
        inter = _first(config, "intermediate_size", "ffn_dim")
    return Dims(hidden_size=d, num_hidden_layers=_first(config, "num_hidden_layers", "n_layer"),
                num_attention_heads=H, num_key_value_heads=_get(config, "num_key_value_heads") or H,
                head_dim=_get(config, "head_dim") or d // H, intermediate_size=inter,
                vocab_size=_get(config, "vocab_size"))


def lora_module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each canonical LoRA target the family has."""
    m = dims_of(config)
    q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    d, i = m.hidden_size, m.intermediate_size
    shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
              "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    targets = FAMILIES[architecture_of(config)].lora_targets \
        if architecture_of(config) in FAMILIES else LORA_TARGETS
    return {k: v for k, v in shapes.items() if k in targets}
