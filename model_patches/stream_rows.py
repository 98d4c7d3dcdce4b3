"""Query-only stream rows: the ``anchor`` form's streams, which attend to the main keys
at positions <= their anchor and to nothing else.

A stream row never needs its own key or value, so it writes nothing to the KV cache: its
attention is the backend's own kernel called with metadata in which each anchor is a
pseudo-request of γ queries over the anchor's t+1 cached main keys, non-causal (every
query sees all t+1 keys; none sees another stream). The same rows serve both draft passes:

* ``separate``: after verification, the rows of each request's accepted anchor run alone
  through the top N_s layers;
* ``fused``: inside the verification forward, rows for every potential anchor join the
  main rows at layer L-N_s; the top layers' linears run on both at once, the main rows'
  attention writes this step's keys first, then the stream rows attend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class StreamRows:
    """One batch of query-only stream rows, ``num_streams`` per anchor."""

    #: stream-layer name -> attention metadata of the anchors as pseudo-requests
    metadata: dict[str, Any]
    #: rotary positions t+j of the rows, anchor-major ``[A * num_streams]``
    positions: torch.Tensor
    num_streams: int
    #: fused: the anchors' indices among the main rows of the verification forward
    anchor_tokens: torch.Tensor | None = None
    #: fused: the main rows' count, set when the stream rows join them
    num_main: int = 0
    #: fused: the rows' final-normed hidden states ``[A * num_streams, d]`` after the forward
    hidden: torch.Tensor | None = None
    #: fused: positions of main and stream rows together (the top layers' rotary input)
    joined_positions: torch.Tensor | None = field(default=None, repr=False)

    @property
    def fused(self) -> bool:
        return self.anchor_tokens is not None

    def attend(self, attn_layer, query: torch.Tensor) -> torch.Tensor:
        """The rows' attention output ``[S, heads * head_size]`` through ``attn_layer``'s
        backend over its KV cache, with this batch's metadata; nothing is written."""
        md = self.metadata[attn_layer.layer_name]
        heads, hd, hd_v = attn_layer.num_heads, attn_layer.head_size, attn_layer.head_size_v
        out = torch.empty(query.shape[0], heads * hd_v, dtype=query.dtype, device=query.device)
        attn_layer.impl.forward(attn_layer, query.reshape(-1, heads, hd), None, None,
                                attn_layer.kv_cache, md, output=out.view(-1, heads, hd_v))
        return out
