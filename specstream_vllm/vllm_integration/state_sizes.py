"""Sizes of the drafter's per-request and growing structures, logged for long runs.

A server must not keep more state the more requests it has served. With
``SPECSTREAM_STATE_LOG=FILE`` the proposer appends one JSON line to FILE every
``EVERY_STEPS`` steps (and at least every ``EVERY_S`` seconds of steps): the engine
process's resident memory and the length of every container held by the proposer, its
draft policy (and the policy's parts) and its match source, found by walking their
attributes (a structure added later is measured without changes here), plus the suffix
cache's request counts and vLLM's own per-request maps in the runner.
``tests/stress/soak.py`` and ``tests/test_soak_short.py`` read it.
"""
from __future__ import annotations

import json
import os
import time

from .. import envs

ENV = "SPECSTREAM_STATE_LOG"
EVERY_STEPS = 10
EVERY_S = 2.0
_OWN_PACKAGE = "specstream_vllm"


def rss_bytes() -> int:
    """This process's resident memory (Linux), 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _size(value) -> int | None:
    if isinstance(value, (dict, list, set, frozenset, tuple)) or type(value).__name__ == "deque":
        return len(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and hasattr(value, "shape"):
        return int(numel())
    return None


def container_sizes(obj, prefix: str, out: dict, depth: int = 2, seen: set | None = None) -> dict:
    """``prefix.attr`` -> len() of every container attribute of ``obj`` and, ``depth``
    levels down, of this package's objects it holds (directly or in a dict's values)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or not hasattr(obj, "__dict__"):
        return out
    seen.add(id(obj))
    for name, value in vars(obj).items():
        n = _size(value)
        if n is not None:
            out[f"{prefix}.{name}"] = n
        if depth <= 0:
            continue
        children = [(name, value)]
        if isinstance(value, dict) and len(value) <= 16:
            children = [(f"{name}[{k}]", v) for k, v in value.items()]
        for child_name, child in children:
            if type(child).__module__.startswith(_OWN_PACKAGE):
                container_sizes(child, f"{prefix}.{child_name}", out, depth - 1, seen)
    return out


def snapshot(proposer) -> dict:
    """The sizes of one proposer's structures now."""
    sizes: dict = {}
    container_sizes(proposer, "proposer", sizes, depth=0)
    if proposer.policy is not None:
        container_sizes(proposer.policy, "policy", sizes)
    match = proposer.match
    if match is not None:
        container_sizes(match, "match", sizes, depth=1)
        cache = getattr(match, "cache", None)       # the suffix trees (ArcticInference)
        if cache is not None:
            sizes["match.cache.active_requests"] = len(cache.active_requests)
            sizes["match.cache.cached_requests"] = len(cache.cached_requests)
    maps = proposer.runner.request_maps() if proposer.runner is not None else {}
    for name, value in maps.items():
        if isinstance(value, dict):
            sizes[f"runner.{name}"] = len(value)
    steps = proposer.policy.stats.steps if proposer.policy is not None else None
    return {"t": time.time(), "pid": os.getpid(), "step": steps, "rss": rss_bytes(),
            "sizes": sizes}


def maybe_log(proposer) -> None:
    """Called once a step by the proposer: append a snapshot when one is due."""
    state = proposer.__dict__.get("_state_log")
    if state is None:       # first step: read the switch once
        state = proposer._state_log = {"path": envs.get(ENV), "steps": 0, "last": 0.0}
    if not state["path"]:
        return
    state["steps"] += 1
    now = time.monotonic()
    if state["steps"] % EVERY_STEPS and now - state["last"] < EVERY_S:
        return
    state["last"] = now
    with open(state["path"], "a") as f:
        f.write(json.dumps(snapshot(proposer)) + "\n")


def read_log(path) -> list[dict]:
    """The snapshots in a state log, oldest first."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
