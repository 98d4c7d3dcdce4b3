"""Query-only stream rows of the ``anchor`` form, as the two draft passes need them.

* :meth:`AnchorRows.separate`: the rows of each request's accepted anchor, for the pass
  after verification;
* :meth:`AnchorRows.fused`: before the verification forward, the rows of every potential
  anchor, i.e. each of a request's last ``drafts + 1`` query positions (the token at
  one of them is the last accepted one); a request still in its prompt gets none, one
  whose prompt ends in this step gets the prompt's last position;
* :meth:`AnchorRows.fused_hidden`: after rejection sampling, the fused rows of the
  accepted anchors.

Rows attend through each stream layer's own backend with metadata built here (every
anchor a non-causal pseudo-request of γ queries over its t+1 main keys; model_patches/
stream_rows.py).
"""
from __future__ import annotations

import numpy as np
import torch

from specstream_vllm.model_patches.stream_rows import StreamRows

from .draft_attention import draft_common_metadata, host_seq_lens, layer_metadata
from .sync_audit import host_numpy


class AnchorRows:
    """Host arithmetic in numpy (nothing here reads the device), tensors for the device."""

    def __init__(self, groups, device: torch.device, num_streams: int):
        self._groups = groups
        self._device = device
        self.num_streams = num_streams
        #: the last fused batch and, per main row of its forward, its anchor's index (-1: none)
        self._fused: StreamRows | None = None
        self._row_of_token: np.ndarray | None = None

    def separate(self, anchor_pos: np.ndarray, block_table: torch.Tensor, g: int,
                 anchor_tokens: torch.Tensor | None = None) -> StreamRows:
        """Rows of streams 1..g at the anchors ``anchor_pos`` [A], whose requests' block
        tables are ``block_table`` [A, blocks]."""
        A = len(anchor_pos)
        pos = (anchor_pos[:, None] + np.arange(1, g + 1)).reshape(-1)
        dev = self._device
        seq = (anchor_pos + 1).astype(np.int32)
        cm = draft_common_metadata(
            query_start_loc_cpu=torch.arange(A + 1, dtype=torch.int32) * g,
            seq_lens_cpu=torch.from_numpy(seq),
            max_seq_len=int(seq.max()),
            positions=torch.from_numpy(pos).to(dev),
            slot_mapping=torch.full((A * g,), -1, dtype=torch.int64, device=dev),
            block_table=block_table,
            query_len=g,
            device=dev,
            causal=False,
        )
        return StreamRows(metadata=layer_metadata(self._groups, cm), positions=cm.positions,
                          num_streams=g, anchor_tokens=anchor_tokens)

    def fused(self, cm, scheduler_output, runner) -> StreamRows | None:
        """Rows of all γ streams at every potential anchor of this verification forward
        (``cm``: its common attention metadata; ``runner``: a RunnerView), or None
        without any."""
        self._fused = self._row_of_token = None
        n = cm.num_reqs
        spec = scheduler_output.scheduled_spec_decode_tokens
        num_drafts = np.array([len(spec.get(r, ())) for r in runner.req_ids()[:n]], dtype=np.int64)
        num_prompt = np.asarray(runner.num_prompt_tokens(n), dtype=np.int64)[:n]
        qsl = host_numpy(cm.query_start_loc_cpu)[: n + 1].astype(np.int64)
        seq = host_seq_lens(cm)[:n]
        qlen = qsl[1:] - qsl[:-1]
        k = np.minimum(num_drafts + 1, qlen)
        k = np.where(seq >= num_prompt, k, 0)
        A = int(k.sum())
        if A == 0:
            return None
        req = np.repeat(np.arange(n), k)
        first = np.repeat(np.cumsum(k) - k, k)
        back = k[req] - (np.arange(A) - first)   # 1 = the request's last query token
        tokens = qsl[1:][req] - back
        pos = seq[req] - back
        bt = cm.block_table_tensor
        table = bt[torch.from_numpy(req).to(bt.device)]
        rows = self.separate(pos, table, self.num_streams,
                             anchor_tokens=torch.from_numpy(tokens).to(self._device))
        row_of_token = np.full(int(qsl[-1]), -1, dtype=np.int64)
        row_of_token[tokens] = np.arange(A)
        self._fused, self._row_of_token = rows, row_of_token
        return rows

    def fused_hidden(self, anchor_tokens: np.ndarray, g: int) -> torch.Tensor | None:
        """Final hidden states ``[R * g, d]`` of streams 1..g at the main rows
        ``anchor_tokens`` [R] of the last fused forward; None if it had no fused rows or
        lacks one of these anchors. Taken once."""
        rows, index = self._fused, self._row_of_token
        self._fused = self._row_of_token = None
        if rows is None or rows.hidden is None or int(anchor_tokens.max()) >= index.size:
            return None
        idx = index[anchor_tokens]
        if (idx < 0).any():
            return None
        h = rows.hidden.view(-1, rows.num_streams, rows.hidden.shape[-1])
        return h[torch.from_numpy(idx).to(h.device), :g].reshape(-1, h.shape[-1])

    def forget(self) -> None:
        self._fused = self._row_of_token = None
