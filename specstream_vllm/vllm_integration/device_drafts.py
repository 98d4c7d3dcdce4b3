"""The proposer's device path: drafts handed to vLLM as a device tensor, no host round trip.

On an accelerator every read of a device value on the host waits for the kernels queued
before it, so the host path's choice (this step's probabilities to the host, the policy
picks each request's drafts) would stall each step until the stream pass finished. Here:

* the host decides from what it already holds: whether the pass runs and over how many
  streams (:meth:`DraftPolicy.plan`), and which requests propose their match-source
  draft instead (:meth:`DraftPolicy.take_candidates`, from the match's calibrated
  confidences and the streams' running profile);
* the device cuts each request's stream drafts with the calibration and cost threshold of
  past steps (``policy.device_cut``) and writes them into a ``[num_reqs, width]`` tensor,
  -1 past each request's drafts (the scheduler patch drops those);
* the probabilities and kept lengths go to pinned host buffers with non-blocking copies;
  they are read at the next step, after vLLM's own copy of the drafts and of the sampled
  tokens has synchronised, and feed the policy then (:meth:`DevicePath.settle`).

vLLM copies the tensor to the host once per step for its scheduler: that round trip is
vLLM's own, the one its EAGLE proposer makes too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..policy import STREAMS, cut_inputs, device_lengths
from . import proposer_report as report
from .sync_audit import host_numpy


@dataclass
class _Staged:
    """A step whose stream drafts are still to be read back."""

    reqs: int                   # requests decoding that step
    req_ids: list[str]          # the requests the pass ran for, in the buffers' row order
    depth: int
    probing: bool
    others: list[int]           # lengths of the requests that proposed the match source
    other_source: str | None


class DevicePath:
    def __init__(self, proposer, max_reqs: int):
        self.p = proposer
        self.device = torch.device(proposer.device)
        pin = self.device.type == "cuda"
        g = proposer.num_streams
        self._probs = torch.zeros((max_reqs, g), dtype=torch.float32, pin_memory=pin)
        self._lengths = torch.zeros(max_reqs, dtype=torch.int64, pin_memory=pin)
        self._staged: _Staged | None = None

    def forget(self) -> None:
        self._staged = None

    def settle(self) -> None:
        """Last step's stream probabilities and kept lengths, on the host by now: into the
        pending acceptance observations and the policy's after-step update."""
        st, self._staged = self._staged, None
        if st is None:
            return
        S, g = len(st.req_ids), st.depth
        probs = host_numpy(self._probs)[:S, :g].astype(np.float64)
        lengths = host_numpy(self._lengths)[:S].copy()
        p = self.p
        for j, rid in enumerate(st.req_ids):
            n = int(lengths[j])
            if n:
                p._pending[rid] = (STREAMS, probs[j, :n].tolist())
        p.policy.after_device_step(st.reqs, torch.from_numpy(probs), torch.from_numpy(lengths),
                                   st.probing, torch.tensor(st.others, dtype=torch.int64),
                                   st.other_source)

    def propose(self, *, cm, rows, reqs, sampled_token_ids, aux_hidden_states, n_sampled,
                n_draft, depth, cands, matches):
        p = self.p
        num_reqs = cm.num_reqs
        # per row: the match draft's length if that request proposes it, else 0 (streams)
        taken = ([0] * len(rows) if cands is None else
                 p.policy.take_candidates(reqs, cands.chain, cands.lengths, depth > 0))
        stream_rows = [r for r, n in zip(rows, taken) if not n]
        chosen = {j: n for j, n in enumerate(taken) if n}
        ids = prob = lengths = None
        probing = False
        if depth > 0 and stream_rows:
            probing = p.policy.begin_device_pass()
            res = p.timed_stream_pass(cm, stream_rows, sampled_token_ids, aux_hidden_states,
                                      n_sampled, n_draft, depth)
            if res is None:  # a rank without gathered logits; the driver rank's drafts are used
                return [[] for _ in range(num_reqs)]
            ids, prob = res[0], res[1]
            cut = cut_inputs(p.policy, reqs, depth)
            lengths = device_lengths(prob, torch.from_numpy(cut.ratio).to(prob.device), cut)
        width = max([depth if ids is not None else 0, *chosen.values()])
        others = list(chosen.values())
        source = cands.source if cands is not None else None
        if width == 0:
            self._count_without_pass(reqs, others, source)
            report.trace(p, reqs, 0, 0)
            report.maybe_report(p)
            return [[] for _ in range(num_reqs)]
        dev = self.device
        out = torch.full((num_reqs, width), -1, dtype=torch.int64, device=dev)
        req_ids = p.runner.req_ids()
        if ids is not None:
            S = len(stream_rows)
            keep = torch.arange(depth, device=ids.device)[None, :] < lengths[:, None]
            out[torch.tensor(stream_rows, device=dev), :depth] = torch.where(
                keep, ids.to(torch.int64), torch.full_like(ids, -1, dtype=torch.int64)).to(dev)
            self._probs[:S, :depth].copy_(prob, non_blocking=True)
            self._lengths[:S].copy_(lengths, non_blocking=True)
            for r in stream_rows:
                p.last_sources[r] = STREAMS
            self._staged = _Staged(reqs, [req_ids[r] for r in stream_rows], depth, probing,
                                   others, source)
        if chosen:
            block = [matches[j].token_ids[:n] + [-1] * (width - n) for j, n in chosen.items()]
            out[torch.tensor([rows[j] for j in chosen], device=dev)] = torch.tensor(
                block, dtype=torch.int64, device=dev)
            for j, n in chosen.items():
                p.last_sources[rows[j]] = source
                p._pending[req_ids[rows[j]]] = (source, matches[j].confidence[:n])
        if ids is None:
            self._count_without_pass(reqs, others, source)
        if p._draft_log:
            self._log(rows, sampled_token_ids, stream_rows, ids, matches, out)
        report.trace(p, reqs, depth if ids is not None else 0, None)
        report.maybe_report(p)
        return out

    def _count_without_pass(self, reqs: int, others: list[int], source: str | None) -> None:
        """A step with no stream pass: its choice (match drafts only, or none) is known now."""
        self.p.policy.after_device_step(reqs, torch.zeros((0, 1), dtype=torch.float64),
                                        torch.zeros(0, dtype=torch.int64), False,
                                        torch.tensor(others, dtype=torch.int64), source)

    def _log(self, rows, sampled_token_ids, stream_rows, ids, matches, out) -> None:
        """The draft log (a debugging switch): reads this step's drafts back."""
        p = self.p
        by_row = dict(zip(stream_rows, ids.tolist())) if ids is not None else {}
        sent = [[t for t in row if t >= 0] for row in out.tolist()]
        report.log_drafts(p, rows, sampled_token_ids, None, [by_row.get(r, []) for r in rows],
                          matches, [p.last_sources[r] for r in rows], sent)
