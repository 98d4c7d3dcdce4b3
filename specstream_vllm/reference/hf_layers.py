"""How the reference model reaches into each HF family's decoder layers.

``reference/streams.py`` holds the stream attention once; a family here only says where
its modules are and how one layer's parts are called: the pre-attention norm, the
q/k/v projections (fused or not), optional per-head q/k norms, the output projection,
the MLP, its norm, and the final norm. LoRA deltas come in through ``lin(name, module,
x)``, which adds the stream-only delta of the canonical target ``name`` (see
``families.py``) to ``module(x)``; for fused projections the family adds each member's
delta to its own slice of the output.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..families import dims_of, family_of

Lin = Callable[[str, nn.Module, torch.Tensor], torch.Tensor]
Delta = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def _plus(y: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    return y if d is None else y + d


class HFLayers:
    """Llama layout (Llama, SmolLM, Mistral, Qwen2, Qwen3): the default."""

    #: attention and MLP read the same normed input and both add to the residual (Phi)
    parallel_block = False

    def __init__(self, causal_lm: nn.Module):
        self.cm = causal_lm
        self.config = causal_lm.config
        self.family = family_of(self.config, architecture(causal_lm))
        self.dims = dims_of(self.config)

    # ---- where things are ----
    def decoder(self) -> nn.Module:
        return self.cm.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def input_embedding(self) -> nn.Module:
        """The raw token embedding E (no position embedding, no embedding norm): what the
        next-token-aware form reads x_{t+1} through."""
        return self.cm.get_input_embeddings()

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder().norm(x)

    # ---- one layer ----
    def attn_norm(self, layer, x):
        return layer.input_layernorm(x)

    def mlp_norm(self, layer, x):
        return layer.post_attention_layernorm(x)

    def qkv(self, layer, h, lin: Lin, delta: Delta):
        a = layer.self_attn
        return lin("q_proj", a.q_proj, h), lin("k_proj", a.k_proj, h), lin("v_proj", a.v_proj, h)

    def kv(self, layer, h):
        """Keys and values of the main stream (no LoRA: the main pass is the base model)."""
        a = layer.self_attn
        return a.k_proj(h), a.v_proj(h)

    def head_norms(self, layer, q, k):
        """Per-head q/k norms ([B, heads, S, hd]) where the family has them (Qwen3)."""
        a = layer.self_attn
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        return q, k

    def out_proj(self, layer, o, lin: Lin):
        return lin("o_proj", layer.self_attn.o_proj, o)

    def mlp(self, layer, h, lin: Lin):
        m = layer.mlp
        return lin("down_proj", m.down_proj, m.act_fn(lin("gate_proj", m.gate_proj, h)) * lin("up_proj", m.up_proj, h))

    def rotary(self, x, positions):
        """cos, sin [B, S, rotary_dim] (HF rotate-half convention)."""
        return self.decoder().rotary_emb(x, positions)

    def attention_scale(self) -> float:
        return self.dims.head_dim ** -0.5


class _FusedQKVLayers(HFLayers):
    """GPT-2 and BLOOM: ``transformer.h`` layers, ``ln_f``, one fused q/k/v projection whose
    output the subclass splits; each member's LoRA delta goes to its own slice."""

    def decoder(self):
        return self.cm.transformer

    def layers(self):
        return self.decoder().h

    def final_norm(self, x):
        return self.decoder().ln_f(x)

    def split_qkv(self, layer, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def qkv(self, layer, h, lin, delta):
        q, k, v = self.split_qkv(layer, h)
        return _plus(q, delta("q_proj", h)), _plus(k, delta("k_proj", h)), _plus(v, delta("v_proj", h))

    def kv(self, layer, h):
        return self.split_qkv(layer, h)[1:]

    def head_norms(self, layer, q, k):
        return q, k


class GPT2Layers(_FusedQKVLayers):
    """GPT-2: fused Conv1D c_attn ([q|k|v]), learned absolute positions at the input."""

    def attn_norm(self, layer, x):
        return layer.ln_1(x)

    def mlp_norm(self, layer, x):
        return layer.ln_2(x)

    def split_qkv(self, layer, h):
        return layer.attn.c_attn(h).split(self.dims.hidden_size, dim=-1)

    def out_proj(self, layer, o, lin):
        return lin("o_proj", layer.attn.c_proj, o)

    def mlp(self, layer, h, lin):
        m = layer.mlp
        return lin("down_proj", m.c_proj, m.act(lin("up_proj", m.c_fc, h)))


class OPTLayers(HFLayers):
    """OPT (pre-LN): separate biased q/k/v, ReLU MLP fc1/fc2, learned positions at the input."""

    def decoder(self):
        return self.cm.model.decoder

    def final_norm(self, x):
        return self.decoder().final_layer_norm(x)

    def attn_norm(self, layer, x):
        return layer.self_attn_layer_norm(x)

    def mlp_norm(self, layer, x):
        return layer.final_layer_norm(x)

    def out_proj(self, layer, o, lin):
        return lin("o_proj", layer.self_attn.out_proj, o)

    def mlp(self, layer, h, lin):
        return lin("down_proj", layer.fc2, layer.activation_fn(lin("up_proj", layer.fc1, h)))


class BloomLayers(_FusedQKVLayers):
    """BLOOM: fused query_key_value laid out per head as [H, 3, hd], ALiBi positions."""

    def split_qkv(self, layer, h):
        m = self.dims
        y = layer.self_attention.query_key_value(h)
        y = y.view(*y.shape[:-1], m.num_attention_heads, 3, m.head_dim)
        return tuple(y[..., i, :].reshape(*y.shape[:-3], -1) for i in range(3))

    def out_proj(self, layer, o, lin):
        return lin("o_proj", layer.self_attention.dense, o)

    def mlp(self, layer, h, lin):
        m = layer.mlp
        return lin("down_proj", m.dense_4h_to_h, m.gelu_impl(lin("up_proj", m.dense_h_to_4h, h)))

    def alibi_slopes(self) -> torch.Tensor:
        """[H] slopes, from transformers' own ALiBi builder (bias = slope * key position)."""
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor
        H = self.dims.num_attention_heads
        alibi = build_alibi_tensor(torch.ones(1, 2), H, torch.float32)  # [H, 1, 2] = slope * (0, 1)
        return alibi[:, 0, 1]


class PhiLayers(HFLayers):
    """Phi-1/1.5/2: parallel attention and MLP on one LayerNorm, partial rotary (the rotary
    module's cos/sin cover the first ``partial_rotary_factor * hd`` dims), optional per-head
    q/k LayerNorms, biased projections and LM head."""

    parallel_block = True

    def final_norm(self, x):
        return self.decoder().final_layernorm(x)

    def mlp_norm(self, layer, x):  # pragma: no cover - parallel block: the MLP reads attn_norm
        raise NotImplementedError

    def head_norms(self, layer, q, k):
        a = layer.self_attn
        if getattr(a, "qk_layernorm", False):
            q, k = a.q_layernorm(q), a.k_layernorm(k)
        return q, k

    def out_proj(self, layer, o, lin):
        return lin("o_proj", layer.self_attn.dense, o)

    def mlp(self, layer, h, lin):
        m = layer.mlp
        return lin("down_proj", m.fc2, m.activation_fn(lin("up_proj", m.fc1, h)))


_BY_ARCH = {"GPT2LMHeadModel": GPT2Layers, "OPTForCausalLM": OPTLayers, "BloomForCausalLM": BloomLayers,
            "PhiForCausalLM": PhiLayers}


def architecture(causal_lm: nn.Module) -> str:
    """The HF architecture name; a model built in code has no ``config.architectures``."""
    return (getattr(causal_lm.config, "architectures", None) or [type(causal_lm).__name__])[0]


def hf_layers(causal_lm: nn.Module) -> HFLayers:
    """The layer description of an HF ``*ForCausalLM`` (after peft unwrapping)."""
    return _BY_ARCH.get(architecture(causal_lm), HFLayers)(causal_lm)
