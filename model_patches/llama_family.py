"""MSA models for the Llama family in vLLM: Llama (and SmolLM), Mistral, Qwen2, Qwen3.

They share vLLM's decoder-layer layout (``self_attn.qkv_proj / rotary_emb / attn /
o_proj``, ``mlp.gate_up_proj / act_fn / down_proj``, fused add-RMSNorm) and vLLM's own
EAGLE-3 aux output; Qwen3 adds per-head q/k RMSNorm before rotary. The main forward is
untouched.
"""
from __future__ import annotations

from dataclasses import replace

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from .stream_layers import Layout, StreamModel

LLAMA = Layout(decoder="model", layers="layers", embedding="embed_tokens", final_norm="norm",
               norms=("input_layernorm", "post_attention_layernorm"), attn="self_attn",
               qkv="qkv_proj", o_proj="o_proj", mlp=("mlp.gate_up_proj", "mlp.act_fn", "mlp.down_proj"),
               gated_mlp=True, positions="rope", residual="fused", eagle_aux=True)
QWEN3 = replace(LLAMA, qk_norm=("q_norm", "k_norm"))


class LlamaFamilyMSA(StreamModel):
    layout = LLAMA


class SpecStreamLlamaForCausalLM(LlamaFamilyMSA, LlamaForCausalLM):
    pass


class SpecStreamMistralForCausalLM(LlamaFamilyMSA, MistralForCausalLM):
    pass


class SpecStreamQwen2ForCausalLM(LlamaFamilyMSA, Qwen2ForCausalLM):
    pass


class SpecStreamQwen3ForCausalLM(StreamModel, Qwen3ForCausalLM):
    layout = QWEN3
