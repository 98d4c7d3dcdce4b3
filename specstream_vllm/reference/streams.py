"""Reference Multi-Stream Attention over HF transformers models (every supported family).

This is the executable form of the contract in DESIGN.md, shared by the trainer and
by the parity tests of the vLLM proposer:

* stream j (1..γ) of main position t has input ``h_t + e_j`` where ``h_t`` is the main
  residual stream entering layer ``L - N_s``;
* it runs through the top ``N_s`` decoder layers (with an optional stream-only LoRA
  delta), then the final norm and the LM head, and predicts token ``x_{t+1+j}``;
* it sits at position ``t + j`` (rotary angle or ALiBi key position; families with learned
  absolute positions add them at the input only, so the streams inherit the anchor's
  through ``h_t``) and attends to the main stream's keys/values of the same layer at
  positions ``<= t`` and to streams ``1..j`` of the same ``t`` -- except in the ``anchor``
  form, whose streams attend to the main keys/values ``<= t`` only (a query-only row: no
  stream keys at all, so it can ride inside the verification forward).

Module access per family is in ``hf_layers.py``; the attention is written once here.

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

from ..checkpoint import (DRAFT_VOCAB_KEY, EMBEDDINGS_KEY, TOKEN_MAP_A_KEY, TOKEN_MAP_B_KEY,
                          LoraSpec, StreamCheckpointConfig, attends_streams, lora_module_shapes,
                          next_token_features, reads_tokens)
from ..families import family_of
from .hf_layers import hf_layers


def unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """Return the HF ``*ForCausalLM`` under an optional peft wrapper."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_of(model: nn.Module) -> nn.Module:
    """The HF decoder stack (``model.model``, ``transformer``, ``model.decoder``, ...)."""
    return hf_layers(unwrap_causal_lm(model)).decoder()


def check_architecture(config) -> None:
    family_of(config)


module_shapes = lora_module_shapes


class StreamParams(nn.Module):
    """The only trainable parameters of lossless mode: e_j and the stream-only LoRA."""

    def __init__(self, config, num_streams: int, num_stream_layers: int,
                 lora: LoraSpec | None = None, init_std: float = 0.02,
                 stream_input: str = "paper", token_map_rank: int | None = None):
        super().__init__()
        if reads_tokens(stream_input) != (token_map_rank is not None):
            raise ValueError("the next_token and chain stream inputs need token_map_rank "
                             "(and only they do)")
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
            missing = [n for n in lora.target_modules if n not in shapes]
            if missing:
                raise ValueError(f"LoRA targets {missing} do not exist in this model; it has "
                                 f"{list(shapes)}")
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
        """The streams read tokens through g (the ``next_token`` and ``chain`` forms)."""
        return reads_tokens(self.stream_input)

    @property
    def attends_streams(self) -> bool:
        """Stream rows attend to stream rows too (all forms but ``anchor``: main keys only)."""
        return attends_streams(self.stream_input)

    @property
    def chain(self) -> bool:
        """Stream j reads x_{t+j}: drafted one stream at a time, each reading the last draft."""
        return self.stream_input == "chain"

    def stream_inputs(self, h: torch.Tensor, num_streams: int, next_embeddings: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Stream inputs ``[..., γ, d]`` at anchors with main states ``h`` ``[..., d]``:
        ``h_t + e_j``, plus ``g(x)`` in the token-reading forms, where ``next_embeddings`` is
        the input embedding of x_{t+1} ``[..., d]`` (``next_token``) or of x_{t+1..t+γ}
        ``[..., γ, d]`` (``chain``: stream j reads the token at its own position t+j)."""
        x = h[..., None, :] + self.stream_embeddings[:num_streams].to(h.dtype)
        if self.next_token_aware:
            if next_embeddings is None:
                raise ValueError("token-reading streams need the token sampled at the anchor")
            f = next_token_features(next_embeddings).to(self.token_map_A.dtype)
            g = (f @ self.token_map_A.t() @ self.token_map_B.t()).to(h.dtype)
            x = x + (g if self.chain else g[..., None, :])
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
        device = self.stream_embeddings.device
        self.draft_vocab = None if vocab is None else torch.unique(vocab.to(device, torch.int64))

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


def teacher_tokens(params: StreamParams, ids: torch.Tensor, anchors: torch.Tensor,
                   num_streams: int) -> torch.Tensor | None:
    """The tokens the streams read at ``anchors`` when the text ``ids`` is known (training,
    evaluation on a greedy answer): None (paper form), x_{t+1} (``next_token``, shaped like
    ``anchors``) or x_{t+1..t+γ} (``chain``, ``anchors.shape + (γ,)``). Positions past the
    end repeat the last token; the predictions read from them are never scored."""
    if not params.next_token_aware:
        return None
    if ids.dim() == 1:
        return teacher_tokens(params, ids[None], anchors[None], num_streams)[0]
    width = num_streams if params.chain else 1
    pos = (anchors[..., None] + torch.arange(1, width + 1, device=anchors.device)).clamp(
        max=ids.shape[-1] - 1)
    out = ids[torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (pos.dim() - 1))), pos]
    return out if params.chain else out[..., 0]


# --------------------------------------------------------------------------- main pass

@dataclass
class MainPass:
    logits: torch.Tensor | None  # [B, T, V] or None if not requested
    layer_inputs: dict[int, torch.Tensor]  # residual stream entering each top layer, [B, T, d]
    position_ids: torch.Tensor  # [B, T]
    final: torch.Tensor | None = None  # final-normed hidden states [B, T, d], if requested


@contextmanager
def capture_layer_inputs(model: nn.Module, layer_ids):
    """Record the hidden state entering each of ``layer_ids`` during a forward."""
    layers = hf_layers(unwrap_causal_lm(model)).layers()
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
              attention_mask: torch.Tensor | None = None, with_logits: bool = True,
              with_final: bool = False) -> MainPass:
    """One forward of the unmodified model, keeping the inputs of the stream layers.

    The one main pass of the project: the trainer, the teacher-forced source, evaluation
    and the reference decoder all run it. ``with_final`` skips the LM head and keeps the
    final-normed hidden states instead (the trainers score their own, restricted head);
    without either only the layer inputs are kept.
    """
    if with_logits and with_final:
        raise ValueError("main_pass returns logits or final hidden states, not both")
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    logits = final = None
    with capture_layer_inputs(model, layer_ids) as store:
        if with_logits:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        else:
            out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            final = out.last_hidden_state if with_final else None
    return MainPass(logits, dict(store), pos, final)


# --------------------------------------------------------------------------- stream pass

def _linear(layer_idx: int, name: str, module: nn.Module, x: torch.Tensor,
            params: StreamParams | None) -> torch.Tensor:
    y = module(x)
    if params is not None:
        d = params.delta(layer_idx, name, x)
        if d is not None:
            y = y + d
    return y


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, hd]; cos/sin: [B, S, rd], rd <= hd: the first rd dims rotate (HF's
    rotate-half convention; partial rotary when rd < hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    xr, rest = x[..., :rd], x[..., rd:]
    h = rd // 2
    rot = torch.cat((-xr[..., h:], xr[..., :h]), dim=-1)
    out = xr * cos + rot * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


def _heads(x: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """[B, S, n * hd] -> [B, n, S, hd]"""
    B, S = x.shape[:2]
    return x.view(B, S, n, hd).transpose(1, 2)


def stream_logits(model: nn.Module, params: StreamParams, main: MainPass,
                  anchors: torch.Tensor, num_streams: int | None = None,
                  return_hidden: bool = False, next_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of streams 1..γ at main positions ``anchors`` ([B, A] indices).

    Returns ``[B, A, γ, V]`` (or the final-normed hidden states ``[B, A, γ, d]`` with
    ``return_hidden``). Stream j of anchor t predicts token ``x_{t+1+j}``. Next-token-aware
    streams also need ``next_tokens`` ([B, A]): x_{t+1}, the token sampled at each anchor;
    chain streams need ``[B, A, γ]``: x_{t+1..t+γ} (teacher-forced, or drafted so far; the
    attention among streams is causal, so stream j's output depends on tokens 1..j only).
    ``anchor`` streams attend to the main keys <= t only: their stream part of the softmax
    is dropped, so each stream's output depends on its own input alone.
    """
    cm = unwrap_causal_lm(model)
    fam = hf_layers(cm)
    dims = fam.dims
    g = num_streams or params.num_streams
    B, A = anchors.shape
    H, KV, hd = dims.num_attention_heads, dims.num_key_value_heads, dims.head_dim
    h_first = main.layer_inputs[params.first_layer]
    T = h_first.shape[1]
    bidx = torch.arange(B, device=anchors.device)[:, None]
    # stream inputs: h_t + e_j (+ g(x_{t+1})) at positions t + j
    nxt = None
    if params.next_token_aware:
        if next_tokens is None:
            raise ValueError("next-token-aware streams need next_tokens (x_{t+1} per anchor)")
        if params.chain and next_tokens.shape != (B, A, g):
            raise ValueError(f"chain streams need next_tokens [B, A, {g}], got {tuple(next_tokens.shape)}")
        nxt = fam.input_embedding()(next_tokens)
    x = params.stream_inputs(h_first[bidx, anchors], g, nxt).reshape(B, A * g, -1)
    js = torch.arange(1, g + 1, device=anchors.device)
    spos = (anchors[:, :, None] + js).reshape(B, A * g)
    positions = fam.family.positions
    if positions == "rope":
        s_cos, s_sin = fam.rotary(x, spos)
        m_cos, m_sin = fam.rotary(x, main.position_ids)
    # masks: stream (t, j) sees main t' <= t, and stream j' <= j of the same t (anchor: none)
    main_ok = main.position_ids[:, None, :] <= anchors.reshape(B, A, 1).repeat_interleave(g, 1)  # [B, A*g, T]
    tri = torch.tril(torch.ones(g, g, dtype=torch.bool, device=x.device))  # [g, g]
    acc = torch.promote_types(x.dtype, torch.float32)  # softmax in >= fp32
    if positions == "alibi":  # bias = slope * key position (softmax ignores the query's own)
        slopes = fam.alibi_slopes().to(x.device, acc)[None, :, None, None]
        bias_main = slopes * main.position_ids[:, None, None, :].to(acc)  # [B, H, 1, T]
        bias_str = slopes[..., None] * spos.view(B, 1, A, 1, g).to(acc)  # [B, H, A, 1, g]
    scale = fam.attention_scale()
    rep = H // KV
    for li in params.layer_ids:
        layer = fam.layers()[li]

        def lin(name, module, h, li=li):
            return _linear(li, name, module, h, params)

        def delta(name, h, li=li):
            return params.delta(li, name, h)

        # main keys/values of this layer, recomputed from the main layer input
        km, vm = fam.kv(layer, fam.attn_norm(layer, main.layer_inputs[li]))
        km, vm = _heads(km, KV, hd), _heads(vm, KV, hd)
        _, km = fam.head_norms(layer, km, km)
        # stream queries/keys/values
        hs = fam.attn_norm(layer, x)
        q, ks, vs = fam.qkv(layer, hs, lin, delta)
        q, ks, vs = _heads(q, H, hd), _heads(ks, KV, hd), _heads(vs, KV, hd)
        q, ks = fam.head_norms(layer, q, ks)
        if positions == "rope":
            km = _apply_rope(km, m_cos, m_sin)
            q, ks = _apply_rope(q, s_cos, s_sin), _apply_rope(ks, s_cos, s_sin)
        km_, vm_ = km.repeat_interleave(rep, 1), vm.repeat_interleave(rep, 1)
        s_main = (q @ km_.transpose(-1, -2)).to(acc) * scale  # [B, H, A*g, T]
        if positions == "alibi":
            s_main = s_main + bias_main
        s_main = s_main.masked_fill(~main_ok[:, None], float("-inf"))
        if params.attends_streams:
            qa = q.view(B, H, A, g, hd)
            ks_ = ks.repeat_interleave(rep, 1).view(B, H, A, g, hd)
            vs_ = vs.repeat_interleave(rep, 1).view(B, H, A, g, hd)
            s_str = (qa @ ks_.transpose(-1, -2)).to(acc) * scale  # [B, H, A, g, g]
            if positions == "alibi":
                s_str = s_str + bias_str
            s_str = s_str.masked_fill(~tri, float("-inf")).view(B, H, A * g, g)
            p = torch.softmax(torch.cat([s_main, s_str], dim=-1), dim=-1).to(q.dtype)
            out = p[..., :T] @ vm_ + (p[..., T:].view(B, H, A, g, g) @ vs_).view(B, H, A * g, hd)
        else:
            out = torch.softmax(s_main, dim=-1).to(q.dtype) @ vm_
        out = out.transpose(1, 2).reshape(B, A * g, H * hd)
        if fam.parallel_block:  # x + attn(n(x)) + mlp(n(x))
            x = x + fam.out_proj(layer, out, lin) + fam.mlp(layer, hs, lin)
        else:
            x = x + fam.out_proj(layer, out, lin)
            x = x + fam.mlp(layer, fam.mlp_norm(layer, x), lin)
    x = fam.final_norm(x).view(B, A, g, -1)
    if return_hidden:
        return x
    return cm.lm_head(x)
