"""Reference greedy speculative decoder (single chain, batch 1).

Readable rather than fast: every step is one full forward of the model over the
sequence plus the current draft. That forward both verifies the draft (longest
matching prefix plus the bonus token) and, through the streams at the last accepted
position, produces the next draft -- the same schedule the vLLM proposer follows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .streams import StreamParams, main_pass, stream_logits


@dataclass
class ReferenceAcceptance:
    """The reference decoder's counters in vLLM's terms: a draft is one proposal of γ tokens
    for one step (an engine's are api.results.AcceptanceStats)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, gamma: int, accepted: int) -> None:
        if len(self.accepted_per_position) < gamma:
            self.accepted_per_position += [0] * (gamma - len(self.accepted_per_position))
        self.num_drafts += 1
        self.num_draft_tokens += gamma
        self.num_accepted += accepted
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per target forward in steady state, bonus token included (vLLM's figure)."""
        return 1.0 + self.num_accepted / max(self.num_drafts, 1)

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / max(self.num_drafts, 1) for a in self.accepted_per_position]

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted,
                "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "per_position_acceptance": [round(x, 4) for x in self.per_position_acceptance]}


@torch.no_grad()
def draft_tokens(model, params: StreamParams, input_ids: torch.Tensor, anchor: int,
                 gamma: int, main=None, next_token: int | None = None) -> torch.Tensor:
    """Top-1 chain of the streams at main position ``anchor`` of ``input_ids`` [1, T].

    ``next_token`` is x_{anchor+1}, the token decoded at the anchor (default: the one in
    ``input_ids``); next-token-aware streams are conditioned on it. Chain streams are
    drafted one at a time: stream j reads stream j-1's draft (a pass over streams 1..j,
    whose attention among themselves is causal, so earlier streams are unchanged)."""
    if main is None:
        main = main_pass(model, input_ids, params.layer_ids, with_logits=False)
    dev = input_ids.device
    anchors = torch.tensor([[anchor]], device=dev)
    if not params.next_token_aware:
        return params.draft_argmax(stream_logits(model, params, main, anchors, gamma)[0, 0])
    tok = int(input_ids[0, anchor + 1]) if next_token is None else next_token
    if not params.chain:
        nxt = torch.tensor([[tok]], device=dev)
        return params.draft_argmax(stream_logits(model, params, main, anchors, gamma,
                                                 next_tokens=nxt)[0, 0])
    read = [tok]
    for j in range(1, gamma + 1):
        nxt = torch.tensor([[read]], device=dev)
        draft = int(params.draft_argmax(stream_logits(model, params, main, anchors, j,
                                                      next_tokens=nxt)[0, 0, j - 1]))
        read.append(draft)
    return torch.tensor(read[1:], device=dev)


@torch.no_grad()
def speculative_generate(model, params: StreamParams, input_ids: torch.Tensor,
                         max_new_tokens: int, gamma: int,
                         eos_token_id: int | None = None) -> tuple[list[int], ReferenceAcceptance]:
    """Greedy speculative decoding; returns the new tokens and acceptance counters."""
    assert input_ids.shape[0] == 1, "the reference decoder runs one sequence"
    if gamma > params.num_streams:
        raise ValueError(f"gamma={gamma} exceeds the {params.num_streams} trained streams")
    stats = ReferenceAcceptance()
    seq = input_ids[0].tolist()
    out: list[int] = []
    draft: list[int] = []
    dev = input_ids.device
    while len(out) < max_new_tokens:
        ids = torch.tensor([seq + draft], device=dev)
        main = main_pass(model, ids, params.layer_ids)
        n0 = len(seq)
        # main prediction after seq[-1], after each draft token
        preds = main.logits[0, n0 - 1:].argmax(-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == preds[accepted]:
            accepted += 1
        if draft:
            stats.record(len(draft), accepted)
        new = draft[:accepted] + [preds[accepted]]
        anchor = n0 - 1 + accepted  # last position whose main output we keep
        stop = False
        for tok in new:
            out.append(tok)
            if (eos_token_id is not None and tok == eos_token_id) or len(out) >= max_new_tokens:
                stop = True
                break
        if stop:
            break
        seq = seq + new
        draft = draft_tokens(model, params, ids, anchor, gamma, main, next_token=new[-1]).tolist()
    return out, stats


def simulate_chain_acceptance(stream_preds: torch.Tensor, tokens: list[int], prompt_len: int,
                              gamma: int, stats: ReferenceAcceptance | None = None) -> ReferenceAcceptance:
    """Replay greedy chain decoding over a known greedy continuation.

    ``stream_preds[t, j-1]`` is stream j's top-1 at anchor t of ``tokens`` (prompt plus the
    model's own greedy answer). Because the answer is what greedy decoding produces, the
    accepted length of every step is fixed by these predictions alone, so one forward
    over the whole sequence measures acceptance exactly as step-by-step decoding would.
    """
    stats = stats or ReferenceAcceptance()
    n = len(tokens)
    t = prompt_len - 1  # the prefill's output gives tokens[prompt_len]; streams at t draft the rest
    while t + 1 + gamma < n:
        acc = 0
        while acc < gamma and int(stream_preds[t, acc]) == tokens[t + 2 + acc]:
            acc += 1
        stats.record(gamma, acc)
        t += acc + 1
    return stats
