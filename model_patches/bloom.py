"""MSA model for BLOOM in vLLM (``bloom.py``): ALiBi (vLLM's ``Attention`` biases each
key by its cache position, so stream j's key at slot t+j gets position t+j), fused
``query_key_value`` (HF's per-head interleaved [H, 3, hd] rows are repacked by vLLM at
load into [q|k|v], so the canonical q/k/v LoRA members shard like Llama's), embedding
LayerNorm at the input. The decoder's forward is swapped for one that also returns h
entering the first stream layer (vLLM's BLOOM has no aux output)."""
from __future__ import annotations

import torch
from vllm.model_executor.models.bloom import BloomForCausalLM, BloomModel
from vllm.model_executor.models.interfaces import SupportsEagle3
from vllm.sequence import IntermediateTensors

from .stream_layers import Layout, StreamModel, layers_with_aux

BLOOM = Layout(decoder="transformer", layers="h", embedding="word_embeddings", final_norm="ln_f",
               norms=("input_layernorm", "post_attention_layernorm"), attn="self_attention",
               qkv="query_key_value", o_proj="dense",
               mlp=("mlp.dense_h_to_4h", "mlp.gelu_impl", "mlp.dense_4h_to_h"), gated_mlp=False,
               positions="alibi")


class BloomModelWithAux(BloomModel):
    """vLLM's ``BloomModel.forward`` (same signature) returning ``(hidden, [aux])``."""

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None):
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        hidden = self.word_embeddings_layernorm(hidden)
        return layers_with_aux(self, BLOOM, hidden, lambda layer, h: layer(position_ids, h))


class SpecStreamBloomForCausalLM(StreamModel, BloomForCausalLM, SupportsEagle3):
    layout = BLOOM
    aux_forward_class = BloomModelWithAux
