"""Result objects returned by :class:`SpeculativeEngine` (plain dataclasses)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from .. import spec_counters

#: vLLM's spec-decode counters now (the package's one counter reader)
read_spec_counters = spec_counters.read


@dataclass
class AcceptanceStats:
    """Speculative-decoding counters over some interval, straight from vLLM.

    ``mean_acceptance_length`` = 1 + accepted / drafts: tokens produced per target
    forward pass of a request (vLLM's definition). NaN when nothing was drafted.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @classmethod
    def delta(cls, before: spec_counters.SpecCounters,
              after: spec_counters.SpecCounters) -> "AcceptanceStats":
        d = after - before
        return cls(d.drafts, d.draft_tokens, d.accepted_tokens, list(d.accepted_per_pos))

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else math.nan

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else math.nan

    @property
    def per_position_rate(self) -> list[float]:
        """Share of drafts whose token at position j (0-based) was accepted."""
        if not self.num_drafts:
            return []
        return [p / self.num_drafts for p in self.accepted_per_position]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_acceptance_length=self.mean_acceptance_length,
                 acceptance_rate=self.acceptance_rate, per_position_rate=self.per_position_rate)
        return d


@dataclass
class GenerationResult:
    """What one :meth:`SpeculativeEngine.generate` call produced and measured."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_token_ids: list[list[int]]
    finish_reasons: list[Optional[str]]
    seconds: float
    acceptance: AcceptanceStats
    batched: bool = False  # the call received a list of prompts

    @property
    def text(self) -> str:
        """The first (for a single prompt: the only) completion."""
        return self.texts[0]

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens of this call / wall-clock seconds of this call."""
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def mean_acceptance_length(self) -> float:
        return self.acceptance.mean_acceptance_length

    def __str__(self) -> str:
        return self.texts[0] if not self.batched else "\n---\n".join(self.texts)


@dataclass
class EngineMetrics:
    """Running totals since the engine started (from vLLM's counters + wall-clock time)."""

    acceptance: AcceptanceStats
    num_requests: int
    total_generated_tokens: int
    total_seconds: float

    @property
    def num_drafts(self) -> int:
        return self.acceptance.num_drafts

    @property
    def num_draft_tokens(self) -> int:
        return self.acceptance.num_draft_tokens

    @property
    def num_accepted_tokens(self) -> int:
        return self.acceptance.num_accepted_tokens

    @property
    def accepted_per_position(self) -> list[int]:
        return self.acceptance.accepted_per_position

    @property
    def mean_acceptance_length(self) -> float:
        return self.acceptance.mean_acceptance_length

    @property
    def tokens_per_second(self) -> float:
        return self.total_generated_tokens / self.total_seconds if self.total_seconds else math.nan

    def to_dict(self) -> dict:
        return {**self.acceptance.to_dict(), "num_requests": self.num_requests,
                "total_generated_tokens": self.total_generated_tokens,
                "total_seconds": self.total_seconds, "tokens_per_second": self.tokens_per_second}


@dataclass
class MemoryOverhead:
    """Measured memory of the speculative engine vs the baseline engine (bytes).

    * ``stream_parameter_bytes``: size of the stream tensors (embeddings + stream LoRA) at
      the serving dtype, read from the checkpoint;
    * ``*_engine_rss_bytes``: peak RSS of each engine's process tree sampled every 0.1 s
      while the benchmark prompts ran (see :mod:`specstream_vllm.api._memory`);
    * ``*_engine_hwm_bytes``: lifetime peak RSS (VmHWM) of each engine's child processes,
      which includes model loading;
    * ``rss_overhead_bytes`` = speculative - baseline peak RSS. Process RSS is noisy at the
      tens-of-MB level (allocator caches, Python objects), so small differences, even
      negative ones, are within noise; ``stream_parameter_bytes`` is exact.
    """

    stream_parameter_bytes: int
    speculative_engine_rss_bytes: int
    baseline_engine_rss_bytes: int
    speculative_engine_hwm_bytes: int
    baseline_engine_hwm_bytes: int

    @property
    def rss_overhead_bytes(self) -> int:
        return self.speculative_engine_rss_bytes - self.baseline_engine_rss_bytes

    @property
    def rss_overhead_fraction(self) -> float:
        b = self.baseline_engine_rss_bytes
        return self.rss_overhead_bytes / b if b else math.nan

    def to_dict(self) -> dict:
        return {**asdict(self), "rss_overhead_bytes": self.rss_overhead_bytes,
                "rss_overhead_fraction": self.rss_overhead_fraction}


@dataclass
class BenchmarkResult:
    """Same prompts, same settings, with and without speculation (one benchmark call)."""

    num_prompts: int
    num_runs: int
    max_new_tokens: int
    gamma: int
    speculative_tokens_per_second: float
    baseline_tokens_per_second: float
    speculative_run_tokens_per_second: list[float]
    baseline_run_tokens_per_second: list[float]
    acceptance: AcceptanceStats
    memory: MemoryOverhead
    speculative_token_ids: list[list[int]]  # outputs of the last run, per prompt
    baseline_token_ids: list[list[int]]

    @property
    def speedup(self) -> float:
        """Mean over runs of (speculative tok/s / baseline tok/s) is noisy on a shared
        machine; this is the ratio of the run-averaged rates."""
        return self.speculative_tokens_per_second / self.baseline_tokens_per_second

    @property
    def mean_acceptance_length(self) -> float:
        return self.acceptance.mean_acceptance_length

    @property
    def per_position_acceptance(self) -> list[float]:
        return self.acceptance.per_position_rate

    @property
    def identical_outputs(self) -> int:
        """Prompts whose last-run outputs are token-identical with and without speculation
        (expected for all of them with greedy decoding in float32)."""
        return sum(a == b for a, b in zip(self.speculative_token_ids, self.baseline_token_ids))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(speedup=self.speedup, mean_acceptance_length=self.mean_acceptance_length,
                 per_position_acceptance=self.per_position_acceptance,
                 identical_outputs=self.identical_outputs,
                 acceptance=self.acceptance.to_dict(), memory=self.memory.to_dict())
        return d

    def summary(self) -> str:
        mib = 2 ** 20
        m = self.memory
        return "\n".join([
            f"prompts {self.num_prompts} x runs {self.num_runs}, up to {self.max_new_tokens} new tokens, gamma {self.gamma}",
            f"  no speculation : {self.baseline_tokens_per_second:8.1f} tok/s",
            f"  specstream     : {self.speculative_tokens_per_second:8.1f} tok/s",
            f"  speedup        : {self.speedup:8.2f}x",
            f"  mean acceptance length: {self.mean_acceptance_length:.2f}; per position: "
            f"{[round(p, 2) for p in self.per_position_acceptance]}",
            f"  memory: stream params {m.stream_parameter_bytes / mib:.2f} MiB; engine peak RSS "
            f"{m.speculative_engine_rss_bytes / mib:.0f} vs {m.baseline_engine_rss_bytes / mib:.0f} MiB "
            f"(difference {m.rss_overhead_bytes / mib:+.0f} MiB)",
            f"  greedy outputs identical: {self.identical_outputs}/{self.num_prompts}",
        ])
