"""MSA model for GPT-2 in vLLM (``gpt2.py``): fused ``c_attn`` [q|k|v] with biases,
LayerNorm, learned absolute positions added at the input only (streams inherit the
anchor's position through h_t). vLLM's GPT-2 has no aux output: the decoder's forward
is swapped for one that also returns h entering the first stream layer."""
from __future__ import annotations

import torch
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel, GPT2Model
from vllm.model_executor.models.interfaces import SupportsEagle3
from vllm.sequence import IntermediateTensors

from .stream_layers import Layout, StreamModel, layers_with_aux

GPT2 = Layout(decoder="transformer", layers="h", embedding="wte", final_norm="ln_f",
              norms=("ln_1", "ln_2"), attn="attn", qkv="c_attn", o_proj="c_proj",
              mlp=("mlp.c_fc", "mlp.act", "mlp.c_proj"), gated_mlp=False, positions="learned")


class GPT2ModelWithAux(GPT2Model):
    """vLLM's ``GPT2Model.forward`` (same signature: torch.compile marks its dynamic
    dims by argument name) returning ``(hidden, [aux])``."""

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        hidden = inputs_embeds + self.wpe(position_ids)
        return layers_with_aux(self, GPT2, hidden, lambda layer, h: layer(h))


class SpecStreamGPT2LMHeadModel(StreamModel, GPT2LMHeadModel, SupportsEagle3):
    layout = GPT2
    aux_forward_class = GPT2ModelWithAux
