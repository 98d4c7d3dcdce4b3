"""vLLM's spec-decode counters, from ``LLM.get_metrics()`` or a Prometheus ``/metrics`` page.

Counter names (vllm/v1/spec_decode/metrics.py, vLLM 0.32): ``vllm:spec_decode_num_drafts``,
``vllm:spec_decode_num_draft_tokens``, ``vllm:spec_decode_num_accepted_tokens`` and the vector
``vllm:spec_decode_num_accepted_tokens_per_pos`` (label ``position``); specstream engines add
``vllm:spec_decode_specstream_steps`` and ``..._steps_without_drafts`` (its draft policy), and
per draft source (label ``source``: ``streams``, ``suffix``, ``ngram``)
``vllm:spec_decode_specstream_source_drafts``, ``..._source_draft_tokens``,
``..._source_accepted_tokens``. Prometheus adds ``_total``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

PREFIX = "vllm:spec_decode_"
_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class SpecCounters:
    """Cumulative spec-decode counters; subtract two snapshots to get a phase's figures."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    steps: int = 0                      # specstream only: decode steps
    steps_without_drafts: int = 0       # specstream only: of which nothing was drafted
    # specstream only: source -> [drafts, draft tokens, accepted tokens]
    sources: dict[str, list[int]] = field(default_factory=dict)

    def __sub__(self, other: "SpecCounters") -> "SpecCounters":
        n = max(len(self.accepted_per_pos), len(other.accepted_per_pos))
        a = self.accepted_per_pos + [0] * (n - len(self.accepted_per_pos))
        b = other.accepted_per_pos + [0] * (n - len(other.accepted_per_pos))
        sources = {k: [x - y for x, y in zip(self.sources.get(k, [0, 0, 0]),
                                             other.sources.get(k, [0, 0, 0]))]
                   for k in sorted(set(self.sources) | set(other.sources))}
        return SpecCounters(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                            self.accepted_tokens - other.accepted_tokens,
                            [x - y for x, y in zip(a, b)], self.steps - other.steps,
                            self.steps_without_drafts - other.steps_without_drafts, sources)

    def __add__(self, other: "SpecCounters") -> "SpecCounters":
        return self - SpecCounters(-other.drafts, -other.draft_tokens, -other.accepted_tokens,
                                   [-x for x in other.accepted_per_pos], -other.steps,
                                   -other.steps_without_drafts,
                                   {k: [-x for x in v] for k, v in other.sources.items()})

    def to_json(self) -> dict[str, Any]:
        return {"drafts": self.drafts, "draft_tokens": self.draft_tokens,
                "accepted_tokens": self.accepted_tokens,
                "accepted_per_pos": list(self.accepted_per_pos),
                "steps": self.steps, "steps_without_drafts": self.steps_without_drafts,
                **({"sources": {k: list(v) for k, v in self.sources.items()}} if self.sources else {}),
                **summarize(self)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SpecCounters":
        return SpecCounters(int(d.get("drafts", 0)), int(d.get("draft_tokens", 0)),
                            int(d.get("accepted_tokens", 0)),
                            [int(x) for x in d.get("accepted_per_pos", [])],
                            int(d.get("steps", 0)), int(d.get("steps_without_drafts", 0)),
                            {k: [int(x) for x in v] for k, v in (d.get("sources") or {}).items()})


def summarize(c: SpecCounters) -> dict[str, Any]:
    """Mean acceptance length (with the bonus token, as vLLM logs it) and per-position rates."""
    if c.drafts <= 0:
        return {"mean_acceptance_length": None, "acceptance_per_pos": [], "draft_acceptance_rate": None,
                **_policy_summary(c)}
    return {
        "mean_acceptance_length": 1.0 + c.accepted_tokens / c.drafts,
        "acceptance_per_pos": [x / c.drafts for x in c.accepted_per_pos],
        "draft_acceptance_rate": (c.accepted_tokens / c.draft_tokens) if c.draft_tokens else None,
        **_policy_summary(c),
    }


def _policy_summary(c: SpecCounters) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if c.steps > 0:
        out.update({"no_spec_step_share": c.steps_without_drafts / c.steps,
                    "draft_tokens_per_step": c.draft_tokens / c.steps})
    if c.sources:  # per source: share of drafts, mean acceptance length of its drafts
        total = sum(v[0] for v in c.sources.values())
        out["by_source"] = {k: {"draft_share": v[0] / total if total else None,
                                "mean_acceptance_length": 1.0 + v[2] / v[0] if v[0] else None}
                            for k, v in c.sources.items()}
    return out


_SOURCE_FIELDS = {PREFIX + "specstream_source_drafts": 0, PREFIX + "specstream_source_draft_tokens": 1,
                  PREFIX + "specstream_source_accepted_tokens": 2}


def _add_source(c: SpecCounters, name: str, source: str | None, value: int) -> None:
    if source is not None:
        c.sources.setdefault(source, [0, 0, 0])[_SOURCE_FIELDS[name]] += value


def from_vllm_metrics(metrics: Iterable[Any]) -> SpecCounters:
    """Sum counters over engines from ``LLM.get_metrics()`` (Counter/Vector objects)."""
    c = SpecCounters()
    for m in metrics:
        name = getattr(m, "name", "")
        if name == PREFIX + "num_drafts":
            c.drafts += int(m.value)
        elif name == PREFIX + "num_draft_tokens":
            c.draft_tokens += int(m.value)
        elif name == PREFIX + "num_accepted_tokens":
            c.accepted_tokens += int(m.value)
        elif name == PREFIX + "specstream_steps":
            c.steps += int(m.value)
        elif name == PREFIX + "specstream_steps_without_drafts":
            c.steps_without_drafts += int(m.value)
        elif name in _SOURCE_FIELDS:
            _add_source(c, name, (getattr(m, "labels", None) or {}).get("source"), int(m.value))
        elif name == PREFIX + "num_accepted_tokens_per_pos":
            vals = [int(v) for v in m.values]
            if len(c.accepted_per_pos) < len(vals):
                c.accepted_per_pos += [0] * (len(vals) - len(c.accepted_per_pos))
            for i, v in enumerate(vals):
                c.accepted_per_pos[i] += v
    return c


def from_prometheus_text(text: str) -> SpecCounters:
    """Parse the spec-decode counters out of a Prometheus exposition page (sum over engines)."""
    c = SpecCounters()
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        name = m.group("name").removesuffix("_total")
        try:
            value = int(float(m.group("value")))
        except ValueError:
            continue
        if name == PREFIX + "num_drafts":
            c.drafts += value
        elif name == PREFIX + "num_draft_tokens":
            c.draft_tokens += value
        elif name == PREFIX + "num_accepted_tokens":
            c.accepted_tokens += value
        elif name == PREFIX + "specstream_steps":
            c.steps += value
        elif name == PREFIX + "specstream_steps_without_drafts":
            c.steps_without_drafts += value
        elif name in _SOURCE_FIELDS:
            _add_source(c, name, dict(_LABEL.findall(m.group("labels") or "")).get("source"), value)
        elif name == PREFIX + "num_accepted_tokens_per_pos":
            labels = dict(_LABEL.findall(m.group("labels") or ""))
            pos = int(labels.get("position", -1))
            if pos >= 0:
                per_pos[pos] = per_pos.get(pos, 0) + value
    if per_pos:
        c.accepted_per_pos = [per_pos.get(i, 0) for i in range(max(per_pos) + 1)]
    return c
