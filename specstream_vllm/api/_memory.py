"""Resident memory of an engine's process tree, measured with psutil.

vLLM's ``LLM`` runs the engine core (model weights, KV cache, drafter) in child
processes; the process that owns the ``LLM`` keeps the tokenizer and output processing.
"Engine memory" here is: RSS of all descendant processes + the growth of the owner's RSS
since just before ``LLM(...)`` was constructed. The same function measures the
speculative engine (in the caller's process) and the baseline engine (in its own
subprocess), so the two figures are comparable. RSS counts touched pages only: KV-cache
pages that were never written are not included.
"""
from __future__ import annotations

import os
import threading
import time


def _tree_rss(owner_base_rss: int) -> int:
    import psutil
    me = psutil.Process(os.getpid())
    total = max(0, me.memory_info().rss - owner_base_rss)
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def owner_rss() -> int:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss


def children_hwm() -> int:
    """Sum of the lifetime peak RSS (VmHWM) of all descendant processes (Linux only; 0 elsewhere)."""
    import psutil
    total = 0
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            with open(f"/proc/{child.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakSampler:
    """Sample the engine-tree RSS every ``interval`` seconds in a thread; keep the peak."""

    def __init__(self, owner_base_rss: int, interval: float = 0.1):
        self.base = owner_base_rss
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            self.peak = max(self.peak, _tree_rss(self.base))
        except Exception:  # a process vanished mid-scan; the next sample will do
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
