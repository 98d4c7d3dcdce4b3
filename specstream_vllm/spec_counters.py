"""vLLM's spec-decode counters: the one reader, for ``LLM.get_metrics()``, Prometheus text and JSON.

Counter names (vllm/v1/spec_decode/metrics.py, vLLM 0.32): ``vllm:spec_decode_num_drafts``,
``..._num_draft_tokens``, ``..._num_accepted_tokens`` and the vector
``..._num_accepted_tokens_per_pos`` (label ``position``); specstream engines add
``..._specstream_steps`` and ``..._specstream_steps_without_drafts`` (its draft policy) and, per
draft source (label ``source``: ``streams``, ``suffix``, ``ngram``), ``..._specstream_source_drafts``,
``..._source_draft_tokens`` and ``..._source_accepted_tokens``. Prometheus adds ``_total``.
Everything sums over engines (data parallel). Subtract two snapshots to get one phase's figures.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

PREFIX = "vllm:spec_decode_"
DRAFTS = PREFIX + "num_drafts"
DRAFT_TOKENS = PREFIX + "num_draft_tokens"
ACCEPTED = PREFIX + "num_accepted_tokens"
PER_POS = PREFIX + "num_accepted_tokens_per_pos"
STEPS = PREFIX + "specstream_steps"
STEPS_WITHOUT_DRAFTS = PREFIX + "specstream_steps_without_drafts"
_SCALARS = {DRAFTS: "drafts", DRAFT_TOKENS: "draft_tokens", ACCEPTED: "accepted_tokens",
            STEPS: "steps", STEPS_WITHOUT_DRAFTS: "steps_without_drafts"}
_SOURCE_FIELDS = {PREFIX + "specstream_source_drafts": 0, PREFIX + "specstream_source_draft_tokens": 1,
                  PREFIX + "specstream_source_accepted_tokens": 2}
_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class SpecCounters:
    """Cumulative spec-decode counters (or, after subtraction, one interval's)."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    steps: int = 0                      # specstream only: decode steps
    steps_without_drafts: int = 0       # specstream only: of which nothing was drafted
    # specstream only: source -> [drafts, draft tokens, accepted tokens]
    sources: dict[str, list[int]] = field(default_factory=dict)

    def _combine(self, other: "SpecCounters", sign: int) -> "SpecCounters":
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + [0] * (n - len(self.accepted_per_pos))
        b = other.accepted_per_pos + [0] * (n - len(other.accepted_per_pos))
        sources = {k: [x + sign * y for x, y in zip(self.sources.get(k, [0, 0, 0]),
                                                    other.sources.get(k, [0, 0, 0]))]
                   for k in sorted(set(self.sources) | set(other.sources))}
        return SpecCounters(self.drafts + sign * other.drafts,
                            self.draft_tokens + sign * other.draft_tokens,
                            self.accepted_tokens + sign * other.accepted_tokens,
                            [x + sign * y for x, y in zip(a, b)], self.steps + sign * other.steps,
                            self.steps_without_drafts + sign * other.steps_without_drafts, sources)

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        return self._combine(other, -1)

    def __add__(self, other: "SpecCounters") -> "SpecCounters":
        return self._combine(other, 1)

    # ---- derived figures
    @property
    def mean_acceptance_length(self) -> float:
        """1 + accepted / drafts: tokens per target forward of a request (vLLM's definition)."""
        return 1.0 + self.accepted_tokens / self.drafts if self.drafts > 0 else math.nan

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens > 0 else math.nan

    @property
    def per_position_rate(self) -> list[float]:
        """Share of drafts whose token at position j (0-based) was accepted."""
        return [x / self.drafts for x in self.accepted_per_pos] if self.drafts > 0 else []

    def summary(self) -> dict[str, Any]:
        """The derived figures as JSON (None where nothing was drafted)."""
        out: dict[str, Any] = {
            "mean_acceptance_length": None if self.drafts <= 0 else self.mean_acceptance_length,
            "acceptance_per_pos": self.per_position_rate,
            "draft_acceptance_rate": None if self.draft_tokens <= 0 else self.acceptance_rate}
        if self.steps > 0:
            out.update(no_spec_step_share=self.steps_without_drafts / self.steps,
                       draft_tokens_per_step=self.draft_tokens / self.steps)
        if self.sources:  # per source: share of drafts, mean acceptance length of its drafts
            total = sum(v[0] for v in self.sources.values())
            out["by_source"] = {k: {"draft_share": v[0] / total if total else None,
                                    "mean_acceptance_length": 1.0 + v[2] / v[0] if v[0] else None}
                                for k, v in self.sources.items()}
        return out

    # ---- JSON (results files) and vLLM metric names (engine job results)
    def to_json(self) -> dict[str, Any]:
        return {"drafts": self.drafts, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens,
                "accepted_per_pos": list(self.accepted_per_pos),
                "steps": self.steps, "steps_without_drafts": self.steps_without_drafts,
                **({"sources": {k: list(v) for k, v in self.sources.items()}} if self.sources else {}),
                **self.summary()}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SpecCounters":
        return SpecCounters(int(d.get("drafts", 0)), int(d.get("draft_tokens", 0)),
                            int(d.get("accepted_tokens", 0)),
                            [int(x) for x in d.get("accepted_per_pos", [])],
                            int(d.get("steps", 0)), int(d.get("steps_without_drafts", 0)),
                            {k: [int(x) for x in v] for k, v in (d.get("sources") or {}).items()})

    def to_metrics(self) -> dict[str, Any]:
        """{vLLM metric name: value}; per-source counters as ``name{source=S}``."""
        out: dict[str, Any] = {name: getattr(self, attr) for name, attr in _SCALARS.items()}
        out[PER_POS] = list(self.accepted_per_pos)
        for src, vals in self.sources.items():
            for name, i in _SOURCE_FIELDS.items():
                out[f"{name}{{source={src}}}"] = vals[i]
        return out

    @staticmethod
    def from_metrics(d: dict[str, Any]) -> "SpecCounters":
        """Inverse of :meth:`to_metrics` (missing names count 0)."""
        c = SpecCounters()
        for key, value in d.items():
            name, _, label = key.partition("{source=")
            _add(c, name, label.rstrip("}") or None, value)
        return c


def _add(c: SpecCounters, name: str, source: str | None, value: Any, position: int = -1) -> None:
    if name in _SCALARS:
        setattr(c, _SCALARS[name], getattr(c, _SCALARS[name]) + int(value))
    elif name in _SOURCE_FIELDS and source is not None:
        c.sources.setdefault(source, [0, 0, 0])[_SOURCE_FIELDS[name]] += int(value)
    elif name == PER_POS:
        vals = [int(v) for v in value] if isinstance(value, (list, tuple)) else None
        if vals is None:  # one position (Prometheus)
            if position < 0:
                return
            vals = [0] * position + [int(value)]
        if len(c.accepted_per_pos) < len(vals):
            c.accepted_per_pos += [0] * (len(vals) - len(c.accepted_per_pos))
        for i, v in enumerate(vals):
            c.accepted_per_pos[i] += v


def from_vllm_metrics(metrics: Iterable[Any]) -> SpecCounters:
    """Counters from ``LLM.get_metrics()`` (Counter / Vector objects), summed over engines."""
    c = SpecCounters()
    for m in metrics:
        name = getattr(m, "name", "")
        if not name.startswith(PREFIX):
            continue
        value = getattr(m, "values", None) if name == PER_POS else getattr(m, "value", 0)
        _add(c, name, (getattr(m, "labels", None) or {}).get("source"), value or 0)
    return c


def read(llm: Any) -> SpecCounters:
    """The counters of a ``vllm.LLM`` now."""
    return from_vllm_metrics(llm.get_metrics())


def from_prometheus_text(text: str) -> SpecCounters:
    """Counters from a Prometheus exposition page (``/metrics``), summed over engines."""
    c = SpecCounters()
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        m = _LINE.match(line)
        if not m or m.group("name").endswith("_created"):
            continue
        try:
            value = int(float(m.group("value")))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        _add(c, m.group("name").removesuffix("_total"), labels.get("source"), value,
             int(labels.get("position", -1)))
    return c
