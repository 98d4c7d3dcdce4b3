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

import torch

from specstream_vllm.model_patches.stream_rows import StreamRows

from .draft_attention import draft_common_metadata, layer_metadata


class AnchorRows:
    def __init__(self, groups, device: torch.device, num_streams: int):
        self._groups = groups
        self._device = device
        self._offsets = torch.arange(1, num_streams + 1, dtype=torch.int64)
        self.num_streams = num_streams
        #: the last fused batch and, per main row of its forward, its anchor's index (-1: none)
        self._fused: StreamRows | None = None
        self._row_of_token: torch.Tensor | None = None

    def separate(self, anchor_pos: torch.Tensor, block_table: torch.Tensor, g: int,
                 anchor_tokens: torch.Tensor | None = None) -> StreamRows:
        """Rows of streams 1..g at the anchors ``anchor_pos`` [A] (CPU), whose requests'
        block tables are ``block_table`` [A, blocks]."""
        A = anchor_pos.numel()
        pos = (anchor_pos[:, None] + self._offsets[:g]).reshape(-1)
        dev = self._device
        cm = draft_common_metadata(
            query_start_loc_cpu=torch.arange(A + 1, dtype=torch.int32) * g,
            seq_lens_cpu=(anchor_pos + 1).to(torch.int32),
            positions=pos.to(dev),
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
        num_drafts = torch.tensor([len(spec.get(r, ())) for r in runner.req_ids()[:n]],
                                  dtype=torch.int64)
        num_prompt = torch.from_numpy(runner.num_prompt_tokens(n).copy())
        qsl = cm.query_start_loc_cpu[: n + 1].to(torch.int64)
        seq = cm.seq_lens.to("cpu", torch.int64)[:n]
        qlen = qsl[1:] - qsl[:-1]
        k = torch.minimum(num_drafts[:n].to(torch.int64) + 1, qlen)
        k = torch.where(seq >= num_prompt[:n].to(torch.int64), k, torch.zeros_like(k))
        A = int(k.sum())
        if A == 0:
            return None
        req = torch.repeat_interleave(torch.arange(n), k)
        first = torch.repeat_interleave(torch.cumsum(k, 0) - k, k)
        back = k[req] - (torch.arange(A) - first)   # 1 = the request's last query token
        tokens = qsl[1:][req] - back
        pos = seq[req] - back
        table = cm.block_table_tensor[req.to(cm.block_table_tensor.device)]
        rows = self.separate(pos, table, self.num_streams, anchor_tokens=tokens.to(self._device))
        row_of_token = torch.full((int(qsl[-1]),), -1, dtype=torch.int64)
        row_of_token[tokens] = torch.arange(A)
        self._fused, self._row_of_token = rows, row_of_token
        return rows

    def fused_hidden(self, anchor_tokens: torch.Tensor, g: int) -> torch.Tensor | None:
        """Final hidden states ``[R * g, d]`` of streams 1..g at the main rows
        ``anchor_tokens`` [R] of the last fused forward; None if it had no fused rows or
        lacks one of these anchors. Taken once."""
        rows, index = self._fused, self._row_of_token
        self._fused = self._row_of_token = None
        if rows is None or rows.hidden is None or int(anchor_tokens.max()) >= index.numel():
            return None
        idx = index[anchor_tokens]
        if bool((idx < 0).any()):
            return None
        h = rows.hidden.view(-1, rows.num_streams, rows.hidden.shape[-1])
        return h[idx.to(h.device), :g].reshape(-1, h.shape[-1])

    def forget(self) -> None:
        self._fused = self._row_of_token = None
