"""Attention metadata and forward context for a stream pass, built the way vLLM's own
drafters build theirs (``vllm/v1/spec_decode/llm_base_proposer.py``): a fresh
``CommonAttentionMetadata`` with the draft tokens' query and sequence lengths, slots and
block table, turned into each backend's metadata by the attention group's
``build_metadata_for_drafting``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .sync_audit import host_numpy


def host_seq_lens(cm) -> np.ndarray:
    """The step's sequence lengths from the host copy vLLM keeps (exact outside async
    speculative decoding, which specstream does not use); reading ``seq_lens`` itself would
    wait for the device."""
    host = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if host is None:
        host = cm.seq_lens.to("cpu")
    return host_numpy(host[: cm.num_reqs]).astype(np.int64)


def draft_common_metadata(*, query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor,
                          positions: torch.Tensor, slot_mapping: torch.Tensor,
                          block_table: torch.Tensor, query_len: int, device: torch.device,
                          causal: bool = True, max_seq_len: int | None = None):
    """A ``CommonAttentionMetadata`` for ``query_len`` stream tokens per request, causal
    over each request's cache (context, then the streams before it); ``causal=False``:
    every query sees all ``seq_lens`` keys (query-only rows of the anchor form, whose
    pseudo-request's keys are the anchor's main keys 0..t). ``max_seq_len``: the callers
    know it from their own host arithmetic."""
    from vllm.v1.attention.backend import CommonAttentionMetadata
    num_reqs = seq_lens_cpu.shape[0]
    return CommonAttentionMetadata(
        query_start_loc=query_start_loc_cpu.to(device, non_blocking=True),
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens=seq_lens_cpu.to(device, non_blocking=True),
        seq_lens_cpu_upper_bound=seq_lens_cpu,
        num_reqs=num_reqs,
        num_actual_tokens=num_reqs * query_len,
        max_query_len=query_len,
        max_seq_len=int(seq_lens_cpu.max()) if max_seq_len is None else max_seq_len,
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        causal=causal,
        positions=positions,
    )


def layer_metadata(groups_and_names, common_md, draft_index: int = 0) -> dict[str, Any]:
    """Per stream layer, its attention group's drafting metadata for ``common_md``."""
    per_layer = {}
    for group, names in groups_and_names:
        md = group.build_metadata_for_drafting(common_md, draft_index)
        for n in names:
            per_layer[n] = md
    return per_layer


def forward_context(per_layer_md, vllm_config, num_tokens: int, slot_mapping: torch.Tensor,
                    layer_names: list[str]):
    from vllm.forward_context import set_forward_context
    return set_forward_context(per_layer_md, vllm_config, num_tokens=num_tokens,
                               slot_mapping={n: slot_mapping for n in layer_names})
