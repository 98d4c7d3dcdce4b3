"""Host-device round trips in the proposer's step, counted so that a CPU test can hold the
accelerator path to "none beyond vLLM's own".

On a GPU, reading a device tensor on the host (``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``bool``/``int``/``float`` of a tensor, ``.to("cpu")``) waits for every
kernel queued before it. The proposer's device path keeps host numbers in Python lists
and numpy, and takes the tensors vLLM keeps on the host by contract (``*_cpu`` fields of
the attention metadata) through :func:`host_numpy`, which refuses a device tensor. With
``SPECSTREAM_SYNC_AUDIT=<file>`` the proposer counts, per step, every such call made
from this package's device-handling modules on any tensor (on a CPU every tensor is a
host tensor, so the count is stricter than a GPU needs) and appends one JSON line with
the count per call site.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager

import numpy as np
import torch

#: the modules whose calls are counted: everything that handles the step's tensors
_AUDITED = (os.sep + os.path.join("specstream_vllm", "vllm_integration") + os.sep,
            os.sep + "model_patches" + os.sep)
_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
_local = threading.local()


def host_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor vLLM keeps on the host (``query_start_loc_cpu``, ...) as numpy, without a
    copy; a device tensor here would be a round trip, so it is an error."""
    if t.device.type != "cpu":
        raise ValueError(f"host_numpy got a {t.device} tensor: reading it would synchronise")
    return t.numpy()


def _count(name: str) -> None:
    """Count ``name`` if the call two frames up is in an audited module."""
    counts = getattr(_local, "counts", None)
    if counts is None:
        return
    f = sys._getframe(2)
    path = f.f_code.co_filename
    if any(part in path for part in _AUDITED) and not path.endswith("sync_audit.py"):
        site = f"{os.path.basename(path)}:{f.f_lineno} {name}"
        counts[site] = counts.get(site, 0) + 1


def _wrap(name: str, fn):
    def counted(self, *args, **kwargs):
        _count(name)
        return fn(self, *args, **kwargs)
    return counted


def _wrap_to(fn):
    """``.to("cpu")``: a deliberate move to the host. ``.to(device)`` moves towards the
    accelerator (on a CPU the two look alike, so only the spelled-out host counts)."""
    def to(self, *args, **kwargs):
        dev = kwargs.get("device", args[0] if args else None)
        if isinstance(dev, str) and dev.startswith("cpu"):
            _count("to(cpu)")
        return fn(self, *args, **kwargs)
    return to


_installed = False


def _install() -> None:
    global _installed
    if _installed:
        return
    for name in _METHODS:
        setattr(torch.Tensor, name, _wrap(name, getattr(torch.Tensor, name)))
    torch.Tensor.to = _wrap_to(torch.Tensor.to)
    _installed = True


class SyncAudit:
    """Per-step counts of host reads of tensors by call site (``"file:line method"``),
    appended to ``path`` as JSON lines."""

    def __init__(self, path: str):
        self.path = path
        self.step = 0
        self._counts: dict[str, int] = {}
        _install()

    @contextmanager
    def counting(self):
        """Counts the calls made inside (nested uses add to the same step)."""
        outer = getattr(_local, "counts", None)
        _local.counts = self._counts
        try:
            yield
        finally:
            _local.counts = outer

    def step_done(self, path: str, num_reqs: int) -> None:
        """One proposer step ended: write its counts, with the path it took."""
        with open(self.path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": self.step, "path": path,
                                "reqs": num_reqs, "calls": self._counts}) + "\n")
        self.step += 1
        self._counts = {}
