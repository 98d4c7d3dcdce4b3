"""MSA models for the Llama family in vLLM: Llama (and SmolLM), Mistral, Qwen2.

These share vLLM's decoder-layer layout (``self_attn.qkv_proj / rotary_emb / attn /
o_proj``, ``mlp.gate_up_proj / act_fn / down_proj``, fused add-RMSNorm), so one
stream-layer function serves the whole family. The main forward is untouched.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .msa import MSAMixin, ShardedLoRA, StreamSettings, _tp

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
logger = logging.getLogger(__name__)


class LlamaFamilyMSA(MSAMixin):
    """Stream pass over the top N_s layers of a Llama-layout vLLM model."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_streams(vllm_config)
        self._compiled_stream_forward = None
        if not vllm_config.model_config.enforce_eager and os.environ.get("SPECSTREAM_COMPILE_DRAFT") != "0":
            self._compiled_stream_forward = torch.compile(self._stream_forward, dynamic=True)
        first = self.model.layers[self.stream_settings.first_layer].self_attn
        if hasattr(first, "q_norm") or hasattr(first, "k_norm"):
            raise ValueError("q/k-norm attention is not supported by the SpecStream Llama family")

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self._load_streams()
        return loaded

    # ---- LoRA layout: fused members share one ShardedLoRA ----
    def _lora_key(self, layer: int, name: str) -> str:
        fused = "qkv" if name in _QKV else "gate_up" if name in _GATE_UP else name
        return f"{layer}_{fused}"

    def _lora_modules_for_layer(self, cfg, layer: int, s: StreamSettings) -> dict[str, nn.Module]:
        rank, world = _tp()
        d = cfg.hidden_size
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or d // H
        inter = cfg.intermediate_size
        hq = H // world
        kv_rep = max(1, world // KV)
        kv_local = max(1, KV // world)
        kv_head0 = (rank // kv_rep) * kv_local
        out: dict[str, nn.Module] = {}
        targets = set(s.lora_targets)
        r, sc = s.lora_rank, s.lora_scaling
        if targets & set(_QKV):
            slices = [("q_proj", rank * hq * hd, (rank + 1) * hq * hd),
                      ("k_proj", kv_head0 * hd, (kv_head0 + kv_local) * hd),
                      ("v_proj", kv_head0 * hd, (kv_head0 + kv_local) * hd)]
            out[f"{layer}_qkv"] = ShardedLoRA(r, sc, d, out_slices=slices)
        if targets & set(_GATE_UP):
            i_loc = inter // world
            slices = [("gate_proj", rank * i_loc, (rank + 1) * i_loc),
                      ("up_proj", rank * i_loc, (rank + 1) * i_loc)]
            out[f"{layer}_gate_up"] = ShardedLoRA(r, sc, d, out_slices=slices)
        if "o_proj" in targets:
            q_loc = hq * hd
            out[f"{layer}_o_proj"] = ShardedLoRA(
                r, sc, H * hd, in_slice=(rank * q_loc, (rank + 1) * q_loc), full_out=d)
        if "down_proj" in targets:
            i_loc = inter // world
            out[f"{layer}_down_proj"] = ShardedLoRA(
                r, sc, inter, in_slice=(rank * i_loc, (rank + 1) * i_loc), full_out=d)
        return out

    def _with_lora(self, layer: int, fused: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        delta = self.stream_lora_delta(layer, fused, x)
        return y if delta is None else y + delta.to(y.dtype)

    def _stream_layer(self, li: int, positions: torch.Tensor, hidden: torch.Tensor,
                      residual: torch.Tensor | None):
        layer = self.model.layers[li]
        attn, mlp = layer.self_attn, layer.mlp
        if residual is None:
            residual = hidden
            h = layer.input_layernorm(hidden)
        else:
            h, residual = layer.input_layernorm(hidden, residual)
        qkv, _ = attn.qkv_proj(h)
        qkv = self._with_lora(li, "qkv", h, qkv)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        o = attn.attn(q, k, v)  # reads the target's cache, writes the stream slots
        out, _ = attn.o_proj(o)
        out = self._with_lora(li, "o_proj", o, out)
        h, residual = layer.post_attention_layernorm(out, residual)
        gu, _ = mlp.gate_up_proj(h)
        gu = self._with_lora(li, "gate_up", h, gu)
        act = mlp.act_fn(gu)
        down, _ = mlp.down_proj(act)
        down = self._with_lora(li, "down_proj", act, down)
        return down, residual

    def stream_forward(self, stream_inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run stream tokens (``h_t + e_j``, flattened) through the top N_s layers.

        Must be called inside a forward context whose attention metadata describes
        the stream tokens; returns final-normed hidden states for ``compute_logits``.
        Compiled with torch.compile (dynamic shapes) unless the engine runs eagerly
        (``enforce_eager``) or ``SPECSTREAM_COMPILE_DRAFT=0``; if compilation fails the
        pass falls back to eager for good (rerunning it rewrites the same cache slots).
        """
        if self._compiled_stream_forward is not None:
            try:
                return self._compiled_stream_forward(stream_inputs, positions)
            except Exception as exc:  # noqa: BLE001 - a compiler problem must not stop serving
                logger.warning("specstream: compiled stream pass failed (%s: %s); running it "
                               "eagerly from now on", type(exc).__name__, exc)
                self._compiled_stream_forward = None
        return self._stream_forward(stream_inputs, positions)

    def _stream_forward(self, stream_inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        s = self.stream_settings
        hidden, residual = stream_inputs, None
        for li in range(s.first_layer, s.num_layers):
            hidden, residual = self._stream_layer(li, positions, hidden, residual)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def stream_attention_layer_names(self) -> list[str]:
        s = self.stream_settings
        return [self.model.layers[i].self_attn.attn.layer_name
                for i in range(s.first_layer, s.num_layers)]


class SpecStreamLlamaForCausalLM(LlamaFamilyMSA, LlamaForCausalLM):
    pass


class SpecStreamMistralForCausalLM(LlamaFamilyMSA, MistralForCausalLM):
    pass


class SpecStreamQwen2ForCausalLM(LlamaFamilyMSA, Qwen2ForCausalLM):
    pass

