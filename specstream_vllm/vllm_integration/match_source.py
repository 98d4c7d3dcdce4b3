"""Drafts matched in the text: the second candidate beside the streams' draft.

On repetitive text (code to copy, lists, a small model's own loops) a continuation found
in the request's own context beats any learned head; on new text there is none and the
streams draft. This module only finds the match; which draft a request proposes (and how
long) is the draft policy's choice (specstream_vllm/policy), made by the proposer. No vLLM
here: the proposer hands in a :class:`TokenView` of the runner's batch and, for ``ngram``,
vLLM's own n-gram kernel.

* ``suffix``: arctic-inference's ``SuffixDecodingCache`` (the implementation vLLM's
  ``suffix`` method uses): a suffix tree over each active request's prompt and response,
  plus a global tree of earlier responses (bounded, FIFO eviction). The draft comes with
  the tree's own per-token probabilities (path frequencies) and the length of the
  matched context.
* ``ngram``: vLLM's prompt-lookup kernel (``NgramProposer``'s numba function): the
  continuation after the longest earlier occurrence (``ngram_min`` .. ``ngram_max``
  tokens) of the context's last tokens. The kernel returns the draft only; the match
  length is found by asking it again with a larger minimum.

Every draft carries a raw per-position confidence (:func:`confidence`): the chance, as the
match itself sees it, that token j is right given tokens < j were -- the tree's
conditional frequency times ``L / (L + 1)`` for a match of L context tokens (longer
matches repeat more reliably). The policy calibrates it per position and bin on the
acceptance it observes, as it does the streams' probabilities.

State: the suffix cache holds a tree per active request. :meth:`SuffixMatch.sync` feeds
new tokens from the batch and stops every request that left the batch (finished,
aborted, preempted); a request that comes back, or a reused request id, is rebuilt from
its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

SOURCES = ("suffix", "ngram")


@dataclass
class TokenView:
    """The runner's persistent batch, read-only: row i is request ``req_ids[i]``."""

    req_ids: list[str]
    token_ids: np.ndarray          # [rows >= len(req_ids), max_model_len] int32
    num_tokens: np.ndarray         # [rows] tokens so far (prompt + output, no drafts)
    num_prompt_tokens: np.ndarray  # [rows]
    max_model_len: int


@dataclass
class MatchDraft:
    token_ids: list[int]
    confidence: list[float]        # raw per-position confidence, see confidence()
    match_len: int                 # context tokens matched


@dataclass
class MatchStats:
    lookups: int = 0
    found: int = 0
    restarts: int = 0              # requests rebuilt (resumed after preemption, reused id)
    stopped: int = 0               # requests dropped (finished, aborted, preempted)
    extra: dict = field(default_factory=dict)


def confidence(path_probs: list[float] | None, n: int, match_len: int) -> list[float]:
    """Raw per-position confidence of a matched draft of ``n`` tokens: the conditional
    frequency ``path_probs[j] / path_probs[j-1]`` (1 without frequencies) times
    ``L / (L + 1)``."""
    length_factor = match_len / (match_len + 1.0)
    out, prev = [], 1.0
    for j in range(n):
        if path_probs is None:
            cond = 1.0
        else:
            p = float(path_probs[j])
            cond = min(1.0, p / prev) if prev > 0 else 0.0
            prev = p
        out.append(cond * length_factor)
    return out


class MatchSource(Protocol):
    name: str

    def sync(self, view: TokenView) -> None: ...

    def drop_departed(self, req_ids: list[str | None]) -> None: ...

    def propose(self, view: TokenView, rows: list[int], max_tokens: int) -> list[MatchDraft | None]: ...

    def state(self) -> dict: ...


def _room(view: TokenView, row: int, max_tokens: int) -> int:
    """Draft tokens that still fit before max_model_len (vLLM's own rule)."""
    return min(max_tokens, int(view.max_model_len) - int(view.num_tokens[row]) - 1)


class SuffixMatch:
    name = "suffix"

    def __init__(self, max_tree_depth: int = 24, max_cached_requests: int = 10000,
                 max_spec_factor: float = 1.0, min_token_prob: float = 0.1):
        from arctic_inference.suffix_decoding import SuffixDecodingCache

        self.cache = SuffixDecodingCache(max_tree_depth=max_tree_depth,
                                         max_cached_requests=max_cached_requests)
        self.depth = max_tree_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self._fed: dict[str, tuple[int, int]] = {}  # req_id -> (prompt tokens, tokens fed)
        self.stats = MatchStats()

    def sync(self, view: TokenView) -> None:
        """Bring the cache in line with the batch: new tokens in, departed requests out."""
        self.drop_departed(view.req_ids)
        for i, req_id in enumerate(view.req_ids):
            n = int(view.num_tokens[i])
            p = int(view.num_prompt_tokens[i])
            if n <= p:                      # prefill not finished: nothing sampled yet
                continue
            prompt, fed = self._fed.get(req_id, (-1, -1))
            if prompt != p or fed > n:          # new, resumed, or a reused request id
                self._start(req_id, view, i, p, n)
            elif n > fed:
                self.cache.add_active_response(req_id, view.token_ids[i, fed:n])
                self._fed[req_id] = (p, n)

    def drop_departed(self, req_ids: list[str | None]) -> None:
        """Stop the requests no longer in the batch. Run every step, not only when lookups
        are due: where they pause, finished and aborted requests would otherwise stay
        active in the cache (and out of its peers) until the next lookup."""
        if not self._fed:
            return
        live = set(req_ids)
        for req_id in [r for r in self._fed if r not in live]:
            self._stop(req_id)

    def _start(self, req_id: str, view: TokenView, i: int, p: int, n: int) -> None:
        if req_id in self._fed:
            self._stop(req_id)
            self.stats.restarts += 1
        if req_id in self.cache.cached_requests:  # an earlier life of this id: not a peer
            self.cache.evict_cached_response(req_id)
        self.cache.start_request(req_id, view.token_ids[i, :p])
        self.cache.add_active_response(req_id, view.token_ids[i, p:n])
        self._fed[req_id] = (p, n)

    def _stop(self, req_id: str) -> None:
        if req_id in self.cache.active_requests:
            self.cache.stop_request(req_id)
        self._fed.pop(req_id, None)
        self.stats.stopped += 1

    def propose(self, view: TokenView, rows: list[int], max_tokens: int) -> list[MatchDraft | None]:
        out: list[MatchDraft | None] = []
        for i in rows:
            req_id = view.req_ids[i]
            room = _room(view, i, max_tokens)
            if room <= 0 or req_id not in self._fed:
                out.append(None)
                continue
            n = int(view.num_tokens[i])
            self.stats.lookups += 1
            d = self.cache.speculate(req_id, view.token_ids[i, max(0, n - self.depth):n],
                                     max_spec_tokens=room, max_spec_factor=self.max_spec_factor,
                                     min_token_prob=self.min_token_prob)
            if not d.token_ids:
                out.append(None)
                continue
            self.stats.found += 1
            ids = list(d.token_ids)[:room]
            out.append(MatchDraft(ids, confidence(d.probs, len(ids), d.match_len),
                                  int(d.match_len)))
        return out

    def state(self) -> dict:
        s = self.stats
        return {"source": self.name, "active_requests": len(self.cache.active_requests),
                "cached_responses": len(self.cache.cached_requests), "lookups": s.lookups,
                "found": s.found, "restarts": s.restarts, "stopped": s.stopped}


#: vLLM's n-gram kernel: (context tokens, min_n, max_n, max_model_len, k) -> draft array
NgramKernel = Callable[[np.ndarray, int, int, int, int], np.ndarray]


class NgramMatch:
    name = "ngram"

    def __init__(self, kernel: NgramKernel, min_n: int = 2, max_n: int = 5):
        self.kernel, self.min_n, self.max_n = kernel, min_n, max_n
        self.stats = MatchStats()
        # compile the numba kernel now, not in the first decode step
        kernel(np.arange(8, dtype=np.int32) % 3, min_n, max_n, 64, 2)

    def sync(self, view: TokenView) -> None:  # stateless: reads the batch's tokens
        return None

    def drop_departed(self, req_ids: list[str | None]) -> None:
        return None

    def propose(self, view: TokenView, rows: list[int], max_tokens: int) -> list[MatchDraft | None]:
        out: list[MatchDraft | None] = []
        for i in rows:
            n = int(view.num_tokens[i])
            k = _room(view, i, max_tokens)
            if k <= 0 or n < self.min_n:
                out.append(None)
                continue
            ctx = view.token_ids[i, :n]
            self.stats.lookups += 1
            draft = self.kernel(ctx, self.min_n, self.max_n, int(view.max_model_len), k)
            if len(draft) == 0:
                out.append(None)
                continue
            # the kernel keeps the longest match; its length is the largest minimum for
            # which it still finds one
            length = self.min_n
            for m in range(self.max_n, self.min_n, -1):
                if len(self.kernel(ctx, m, self.max_n, int(view.max_model_len), k)):
                    length = m
                    break
            self.stats.found += 1
            ids = [int(t) for t in draft]
            out.append(MatchDraft(ids, confidence(None, len(ids), length), length))
        return out

    def state(self) -> dict:
        return {"source": self.name, "lookups": self.stats.lookups, "found": self.stats.found}


def make_match_source(settings: dict | None, ngram_kernel: Callable[[], NgramKernel] | None = None
                      ) -> MatchSource | None:
    """From the policy's ``match`` settings (config.MatchSettings as a dict); None for
    ``none``. ``ngram_kernel``: returns vLLM's kernel (only called for ``ngram``)."""
    from .config import MatchSettings

    s = dict(settings or {})
    source = s.setdefault("source", "none")
    if source in ("none", None):
        return None
    if source not in ("suffix", "ngram"):
        raise ValueError(f"unknown match source {source!r}")
    m = MatchSettings(**s)
    if source == "suffix":
        return SuffixMatch(m.suffix_max_tree_depth, m.suffix_max_cached_requests,
                           m.suffix_max_spec_factor, m.suffix_min_token_prob)
    if ngram_kernel is None:
        raise ValueError("match source 'ngram' needs vLLM's n-gram kernel")
    return NgramMatch(ngram_kernel(), m.ngram_min, m.ngram_max)
