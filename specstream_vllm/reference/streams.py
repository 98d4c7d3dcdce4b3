"""Reference Multi-Stream Attention over HF transformers Llama-family models.

This is the executable form of the contract in DESIGN.md, shared by the trainer and
by the parity tests of the vLLM proposer:

* stream j (1..γ) of main position t has input ``h_t + e_j`` where ``h_t`` is the main
  residual stream entering layer ``L - N_s``;
* it runs through the top ``N_s`` decoder layers (with an optional stream-only LoRA
  delta), then the final norm and the LM head, and predicts token ``x_{t+1+j}``;
* it sits at rotary position ``t + j`` and attends to the main stream's keys/values of
  the same layer at positions ``<= t`` and to streams ``1..j`` of the same ``t``.

The main stream is the unmodified model, so its per-layer inputs are captured with
forward pre-hooks on the model's own forward and its keys/values are recomputed from
them, which keeps this module independent of transformers' cache classes.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import (DRAFT_VOCAB_KEY, EMBEDDINGS_KEY, SUPPORTED_ARCHITECTURES, TOKEN_MAP_A_KEY,
                          TOKEN_MAP_B_KEY, LoraSpec, StreamCheckpointConfig, lora_module_shapes,
                          next_token_features)
from ..errors import UnsupportedArchitectureError

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """Return the HF ``*ForCausalLM`` under an optional peft wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_of(model: nn.Module) -> nn.Module:
    return unwrap_causal_lm(model).model


def check_architecture(config) -> None:
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch} has no Multi-Stream Attention implementation; supported: "
            f"{list(SUPPORTED_ARCHITECTURES)} (add one under model_patches/)")


module_shapes = lora_module_shapes


class StreamParams(nn.Module):
    """The only trainable parameters of lossless mode: e_j and the stream-only LoRA."""

    def __init__(self, config, num_streams: int, num_stream_layers: int,
                 lora: LoraSpec | None = None, init_std: float = 0.02,
                 stream_input: str = "paper", token_map_rank: int | None = None):
        super().__init__()
        if (stream_input == "next_token") != (token_map_rank is not None):
            raise ValueError("the next_token stream input needs token_map_rank (and only it does)")
        self.stream_input = stream_input
        self.token_map_rank = token_map_rank
        self.num_streams = num_streams
        self.num_stream_layers = num_stream_layers
        self.num_layers = config.num_hidden_layers
        self.lora = lora
        self.stream_embeddings = nn.Parameter(torch.randn(num_streams, config.hidden_size) * init_std)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        #: token ids the streams may draft (None: the whole vocabulary); see checkpoint.py
        self.register_buffer("draft_vocab", None)
        if token_map_rank is not None:  # g(x) = B A n(E[x]); B = 0 at start, as in LoRA
            d = config.hidden_size
            self.token_map_A = nn.Parameter(torch.randn(token_map_rank, d) / math.sqrt(d))
            self.token_map_B = nn.Parameter(torch.zeros(d, token_map_rank))
        if lora is not None:
            shapes = module_shapes(config)
            for layer in self.layer_ids:
                for name in lora.target_modules:
                    fan_in, fan_out = shapes[name]
                    a = torch.empty(lora.rank, fan_in)
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                    self.lora_A[self._key(layer, name)] = nn.Parameter(a)
                    self.lora_B[self._key(layer, name)] = nn.Parameter(torch.zeros(fan_out, lora.rank))

    @property
    def first_layer(self) -> int:
        return self.num_layers - self.num_stream_layers

    @property
    def layer_ids(self) -> range:
        return range(self.first_layer, self.num_layers)

    @staticmethod
    def _key(layer: int, name: str) -> str:
        return f"layers_{layer}_{name}"

    def delta(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor | None:
        key = self._key(layer, name)
        if self.lora is None or key not in self.lora_A:
            return None
        a, b = self.lora_A[key], self.lora_B[key]
        return (x.to(a.dtype) @ a.t() @ b.t()).to(x.dtype) * self.lora.scaling

    @property
    def next_token_aware(self) -> bool:
        return self.stream_input == "next_token"

    def stream_inputs(self, h: torch.Tensor, num_streams: int, next_embeddings: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Stream inputs ``[..., γ, d]`` at anchors with main states ``h`` ``[..., d]``:
        ``h_t + e_j``, plus ``g(x_{t+1})`` in the next-token-aware form, where
        ``next_embeddings`` ``[..., d]`` is the input embedding of x_{t+1}."""
        x = h[..., None, :] + self.stream_embeddings[:num_streams].to(h.dtype)
        if self.next_token_aware:
            if next_embeddings is None:
                raise ValueError("next-token-aware streams need the token sampled at the anchor")
            f = next_token_features(next_embeddings).to(self.token_map_A.dtype)
            g = f @ self.token_map_A.t() @ self.token_map_B.t()
            x = x + g.to(h.dtype)[..., None, :]
        return x

    # ---- checkpoint tensors (names of checkpoint.py) ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {EMBEDDINGS_KEY: self.stream_embeddings.detach()}
        if self.next_token_aware:
            out[TOKEN_MAP_A_KEY] = self.token_map_A.detach()
            out[TOKEN_MAP_B_KEY] = self.token_map_B.detach()
        for key, a in self.lora_A.items():
            _, layer, name = key.split("_", 2)
            out[f"layers.{layer}.{name}.lora_A"] = a.detach()
            out[f"layers.{layer}.{name}.lora_B"] = self.lora_B[key].detach()
        if self.draft_vocab is not None:
            out[DRAFT_VOCAB_KEY] = self.draft_vocab.to(torch.int64)
        return out

    def set_draft_vocab(self, vocab: torch.Tensor | None) -> None:
        self.draft_vocab = None if vocab is None else torch.unique(vocab.to(torch.int64))

    def draft_lm_weight(self, lm_weight: torch.Tensor) -> torch.Tensor:
        """The LM-head rows drafts are chosen from (all rows without a draft vocabulary)."""
        if self.draft_vocab is None:
            return lm_weight
        return lm_weight[self.draft_vocab.to(lm_weight.device)]

    def draft_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Map argmax indices over :meth:`draft_lm_weight` rows back to token ids."""
        return idx if self.draft_vocab is None else self.draft_vocab.to(idx.device)[idx]

    def draft_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Top-1 token ids of full-vocabulary ``logits`` [..., V], within the draft vocabulary."""
        if self.draft_vocab is not None:
            logits = logits[..., self.draft_vocab.to(logits.device)]
        return self.draft_ids(logits.argmax(-1))

    @classmethod
    def from_checkpoint(cls, model_config, cfg: StreamCheckpointConfig,
                        tensors: dict[str, torch.Tensor]) -> "StreamParams":
        p = cls(model_config, cfg.num_streams, cfg.num_stream_layers, cfg.lora,
                stream_input=cfg.stream_input, token_map_rank=cfg.token_map_rank)
        with torch.no_grad():
            p.stream_embeddings.copy_(tensors[EMBEDDINGS_KEY])
            if p.next_token_aware:
                p.token_map_A.copy_(tensors[TOKEN_MAP_A_KEY])
                p.token_map_B.copy_(tensors[TOKEN_MAP_B_KEY])
            for key in p.lora_A:
                _, layer, name = key.split("_", 2)
                p.lora_A[key].copy_(tensors[f"layers.{layer}.{name}.lora_A"])
                p.lora_B[key].copy_(tensors[f"layers.{layer}.{name}.lora_B"])
        if DRAFT_VOCAB_KEY in tensors:
            p.set_draft_vocab(tensors[DRAFT_VOCAB_KEY])
        return p

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------- main pass

@dataclass
class MainPass:
    logits: torch.Tensor | None  # [B, T, V] or None if not requested
    layer_inputs: dict[int, torch.Tensor]  # residual stream entering each top layer, [B, T, d]
    position_ids: torch.Tensor  # [B, T]


@contextmanager
def capture_layer_inputs(model: nn.Module, layer_ids):
    """Record the hidden state entering each of ``layer_ids`` during a forward."""
    layers = decoder_of(model).layers
    store: dict[int, torch.Tensor] = {}
    handles = []
    for i in layer_ids:
        def hook(mod, args, kwargs, i=i):
            store[i] = args[0] if args else kwargs["hidden_states"]
        handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def main_pass(model: nn.Module, input_ids: torch.Tensor, layer_ids,
              attention_mask: torch.Tensor | None = None, with_logits: bool = True) -> MainPass:
    """One forward of the unmodified model, keeping the inputs of the stream layers.

    With ``with_logits=False`` the LM head is skipped (the trainer's lossless mode).
    """
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    with capture_layer_inputs(model, layer_ids) as store:
        if with_logits:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        else:
            decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = None
    return MainPass(logits, dict(store), pos)


# --------------------------------------------------------------------------- stream pass

def _linear(layer_idx: int, name: str, module: nn.Module, x: torch.Tensor,
            params: StreamParams | None) -> torch.Tensor:
    y = module(x)
    if params is not None:
        d = params.delta(layer_idx, name, x)
        if d is not None:
            y = y + d
    return y


def _rope(model: nn.Module, x: torch.Tensor, positions: torch.Tensor):
    return decoder_of(model).rotary_emb(x, positions)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, hd]; cos/sin: [B, S, hd] (HF's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


def stream_logits(model: nn.Module, params: StreamParams, main: MainPass,
                  anchors: torch.Tensor, num_streams: int | None = None,
                  return_hidden: bool = False, next_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of streams 1..γ at main positions ``anchors`` ([B, A] indices).

    Returns ``[B, A, γ, V]`` (or the final-normed hidden states ``[B, A, γ, d]`` with
    ``return_hidden``). Stream j of anchor t predicts token ``x_{t+1+j}``. Next-token-aware
    streams also need ``next_tokens`` ([B, A]): x_{t+1}, the token sampled at each anchor.
    """
    cm = unwrap_causal_lm(model)
    cfg = cm.config
    dec = cm.model
    g = num_streams or params.num_streams
    B, A = anchors.shape
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    first = params.first_layer
    h_first = main.layer_inputs[first]
    T = h_first.shape[1]
    bidx = torch.arange(B, device=anchors.device)[:, None]
    # stream inputs: h_t + e_j (+ g(x_{t+1})) at positions t + j
    nxt = None
    if params.next_token_aware:
        if next_tokens is None:
            raise ValueError("next-token-aware streams need next_tokens (x_{t+1} per anchor)")
        nxt = dec.embed_tokens(next_tokens)
    x = params.stream_inputs(h_first[bidx, anchors], g, nxt).reshape(B, A * g, -1)
    js = torch.arange(1, g + 1, device=anchors.device)
    spos = (anchors[:, :, None] + js).reshape(B, A * g)
    s_cos, s_sin = _rope(model, x, spos)
    m_cos, m_sin = _rope(model, x, main.position_ids)
    # masks: stream (t, j) sees main t' <= t, and stream j' <= j of the same t
    main_ok = main.position_ids[:, None, :] <= anchors.reshape(B, A, 1).repeat_interleave(g, 1)  # [B, A*g, T]
    tri = torch.tril(torch.ones(g, g, dtype=torch.bool, device=x.device))  # [g, g]
    for li in params.layer_ids:
        layer = dec.layers[li]
        attn, mlp = layer.self_attn, layer.mlp
        # main keys/values of this layer, recomputed from the main layer input
        hm = layer.input_layernorm(main.layer_inputs[li])
        km = attn.k_proj(hm).view(B, T, KV, hd).transpose(1, 2)
        vm = attn.v_proj(hm).view(B, T, KV, hd).transpose(1, 2)
        km = _apply_rope(km, m_cos, m_sin)
        # stream queries/keys/values
        hs = layer.input_layernorm(x)
        q = _linear(li, "q_proj", attn.q_proj, hs, params).view(B, A * g, H, hd).transpose(1, 2)
        ks = _linear(li, "k_proj", attn.k_proj, hs, params).view(B, A * g, KV, hd).transpose(1, 2)
        vs = _linear(li, "v_proj", attn.v_proj, hs, params).view(B, A * g, KV, hd).transpose(1, 2)
        q = _apply_rope(q, s_cos, s_sin)
        ks = _apply_rope(ks, s_cos, s_sin)
        rep = H // KV
        km_, vm_ = km.repeat_interleave(rep, 1), vm.repeat_interleave(rep, 1)
        ks_ = ks.repeat_interleave(rep, 1).view(B, H, A, g, hd)
        vs_ = vs.repeat_interleave(rep, 1).view(B, H, A, g, hd)
        scale = hd ** -0.5
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32
        s_main = (q @ km_.transpose(-1, -2)).to(acc) * scale  # [B, H, A*g, T]
        s_main = s_main.masked_fill(~main_ok[:, None], float("-inf"))
        qa = q.view(B, H, A, g, hd)
        s_str = (qa @ ks_.transpose(-1, -2)).to(acc) * scale  # [B, H, A, g, g]
        s_str = s_str.masked_fill(~tri, float("-inf")).view(B, H, A * g, g)
        p = torch.softmax(torch.cat([s_main, s_str], dim=-1), dim=-1).to(q.dtype)
        out = p[..., :T] @ vm_ + (p[..., T:].view(B, H, A, g, g) @ vs_).view(B, H, A * g, hd)
        out = out.transpose(1, 2).reshape(B, A * g, H * hd)
        x = x + _linear(li, "o_proj", attn.o_proj, out, params)
        hm2 = layer.post_attention_layernorm(x)
        gate = _linear(li, "gate_proj", mlp.gate_proj, hm2, params)
        up = _linear(li, "up_proj", mlp.up_proj, hm2, params)
        x = x + _linear(li, "down_proj", mlp.down_proj, mlp.act_fn(gate) * up, params)
    x = dec.norm(x).view(B, A, g, -1)
    if return_hidden:
        return x
    return cm.lm_head(x)
