"""MSA model for Phi (``PhiForCausalLM``), which vLLM 0.32 serves through its Transformers
backend: HF's own modules with vLLM's fused ``qkv_proj`` (QKVParallelLinear), ``dense``,
``fc1``/``fc2`` and ``Attention`` swapped in. One LayerNorm feeds attention and MLP side
by side (parallel residual); partial rotary is HF's (cos/sin of the model's
``rotary_emb`` at t+j on the first ``rotary_ndims`` of each head); optional per-head
q/k LayerNorms; the LM head has a bias. The backend records the aux hidden state itself
(its EAGLE-3 ``set_aux_hidden_state_layers``)."""
from __future__ import annotations

import torch
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb
from vllm.model_executor.models.transformers import TransformersForCausalLM

from .stream_layers import Layout, StreamModel

PHI = Layout(decoder="model", layers="layers", embedding="embed_tokens", final_norm="final_layernorm",
             norms=("input_layernorm", "input_layernorm"), attn="self_attn", qkv="qkv_proj",
             o_proj="dense", mlp=("mlp.fc1", "mlp.activation_fn", "mlp.fc2"), gated_mlp=False,
             positions="rope", residual="parallel", qk_norm=("q_layernorm", "k_layernorm"),
             eagle_aux=True)


class SpecStreamPhiForCausalLM(StreamModel, TransformersForCausalLM):
    layout = PHI

    def _set_aux_layer(self) -> None:
        TransformersForCausalLM.set_aux_hidden_state_layers(self, (self.stream_settings.first_layer,))

    def _rotary(self, attn, positions, q, k):
        hd, rot, n = attn.head_dim, attn.rotary_ndims, q.shape[0]
        cos, sin = self.model.rotary_emb(q, positions[None])
        qh, kh = (x.view(1, n, -1, hd).transpose(1, 2) for x in (q, k))  # [1, heads, n, hd]
        q_rot, k_rot = apply_rotary_pos_emb(qh[..., :rot], kh[..., :rot], cos, sin)
        qh, kh = torch.cat((q_rot, qh[..., rot:]), -1), torch.cat((k_rot, kh[..., rot:]), -1)
        return qh.transpose(1, 2).reshape(n, -1), kh.transpose(1, 2).reshape(n, -1)
