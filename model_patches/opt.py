"""MSA model for OPT in vLLM (``opt.py``), pre-LN variants only (see
``specstream_vllm.families.check_variant``): fused ``qkv_proj`` with biases, LayerNorm, learned
positions added at the input only. The decoder's forward is swapped for one that also
returns h entering the first stream layer (vLLM's OPT has no aux output)."""
from __future__ import annotations

import torch
from vllm.model_executor.models.interfaces import SupportsEagle3
from vllm.model_executor.models.opt import OPTDecoder, OPTForCausalLM
from vllm.sequence import IntermediateTensors

from .stream_layers import Layout, StreamModel, layers_with_aux

OPT = Layout(decoder="model.decoder", layers="layers", embedding="embed_tokens",
             final_norm="final_layer_norm", norms=("self_attn_layer_norm", "final_layer_norm"),
             attn="self_attn", qkv="qkv_proj", o_proj="out_proj",
             mlp=("fc1", "activation_fn", "fc2"), gated_mlp=False, positions="learned")


class OPTDecoderWithAux(OPTDecoder):
    """vLLM's ``OPTDecoder.forward`` without project_in/out (refused), returning
    ``(hidden, [aux])``; traced inside the compiled ``OPTModel``."""

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        hidden = inputs_embeds + self.embed_positions(positions)
        return layers_with_aux(self, OPT, hidden, lambda layer, h: layer(h))


class SpecStreamOPTForCausalLM(StreamModel, OPTForCausalLM, SupportsEagle3):
    layout = OPT
    aux_forward_class = OPTDecoderWithAux
