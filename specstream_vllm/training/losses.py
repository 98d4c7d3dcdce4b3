"""Chunked LM head + cross-entropy: bounds memory to ``chunk x vocab`` logits.

Each chunk's logits are recomputed in the backward pass (activation checkpointing), so
the full ``[N, V]`` logits tensor never exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = (h.to(weight.dtype) @ weight.t()).float()
    return logits if bias is None else logits + bias.float()  # biased LM heads (Phi)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                target_h: torch.Tensor | None, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _logits(h, weight, bias)
    if target_h is None:
        nll = F.cross_entropy(logits, labels, reduction="none")
    else:  # soft targets: the base model's own distribution (self-distillation)
        with torch.no_grad():
            t_logits = _logits(target_h, weight, bias)
            p = torch.softmax(t_logits, dim=-1)
            if labels is None:  # correctness against the base model's own top-1
                labels = t_logits.argmax(-1)
        nll = -(p * torch.log_softmax(logits, dim=-1)).sum(-1)
    correct = (logits.detach().argmax(-1) == labels).float()
    return (nll * w).sum(), correct


def chunked_lm_loss(hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor | None,
                    weights: torch.Tensor, chunk: int = 1024,
                    target_hidden: torch.Tensor | None = None, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of per-row losses and per-row top-1 correctness.

    hidden: ``[N, d]`` final-normed states; labels ``[N]``; weights ``[N]`` (0 = ignore);
    target_hidden: optional ``[N, d]`` final-normed states of the base model whose softmax
    is the target distribution; with it, ``labels=None`` scores correctness against the
    target's own top-1.
    """
    if labels is None and target_hidden is None:
        raise ValueError("chunked_lm_loss needs labels or target_hidden")
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = []

    def lab(s: int, e: int):
        return None if labels is None else labels[s:e]

    for s in range(0, hidden.shape[0], chunk):
        e = s + chunk
        th = None if target_hidden is None else target_hidden[s:e]
        if hidden.requires_grad:
            loss, corr = checkpoint(_chunk_loss, hidden[s:e], lm_weight, lab(s, e), weights[s:e],
                                    th, bias, use_reentrant=False)
        else:
            loss, corr = _chunk_loss(hidden[s:e], lm_weight, lab(s, e), weights[s:e], th, bias)
        total = total + loss
        correct.append(corr)
    return total, torch.cat(correct) if correct else hidden.new_zeros(0)


@torch.no_grad()
def chunked_argmax(hidden: torch.Tensor, lm_weight: torch.Tensor, chunk: int = 1024,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 token of ``hidden @ lm_weight.T (+ bias)`` for ``[N, d]`` rows, chunk by chunk."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        out.append(_logits(hidden[s:s + chunk], lm_weight, bias).argmax(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
