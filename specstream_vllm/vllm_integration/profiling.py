"""Where the time of a step goes (set ``SPECSTREAM_PROFILE=DIR`` to enable).

Wall-clock spans accumulated per process and written as JSON every few steps:
the worker records the verification forward, sampling (rejection sampler
included), the draft pass and the rest of the runner; the engine core records the
scheduler. Off by default: the runner and scheduler patches read the variable when the
engine starts and time nothing when it is unset.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from .. import envs


class SpanTimer:
    def __init__(self, role: str, every: int = 20):
        self.role, self.every = role, every
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._since_dump = 0

    @contextmanager
    def span(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    def step_done(self) -> None:
        self._since_dump += 1
        if self._since_dump >= self.every:
            self.dump()

    def dump(self) -> None:
        self._since_dump = 0
        folder = envs.get("SPECSTREAM_PROFILE")
        if not folder:
            return
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        data = {"role": self.role, "pid": os.getpid(),
                "seconds": dict(self.seconds), "calls": dict(self.calls)}
        tmp = out / f".{self.role}-{os.getpid()}.json"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, out / f"{self.role}-{os.getpid()}.json")


_TIMERS: dict[str, SpanTimer] = {}


def timer(role: str) -> SpanTimer:
    if role not in _TIMERS:
        _TIMERS[role] = SpanTimer(role)
    return _TIMERS[role]


def summarize(profile_dir: str | Path) -> dict:
    """Per-step milliseconds of each span, from the files one run wrote."""
    out: dict = {}
    for f in sorted(Path(profile_dir).glob("*.json")):
        d = json.loads(f.read_text())
        role = d["role"]
        for name, secs in d["seconds"].items():
            n = max(d["calls"].get(name, 1), 1)
            out.setdefault(role, {})[name] = {"calls": n, "ms_per_call": 1000 * secs / n,
                                              "total_s": secs}
    return out
