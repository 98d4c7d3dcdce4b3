"""The policy's host arrays: numpy, float64 and int64.

The policy's arithmetic runs on a few dozen numbers per step on the host, where a torch
operation costs several microseconds of dispatch and a numpy one about one: in torch the
policy took over a millisecond of every step at batch 1, about 6% of a bf16 step of a
135M model on a CPU. Inputs may be torch tensors on the CPU (the proposer's, the tests').
"""
from __future__ import annotations

import numpy as np


def _host(x):
    """A CPU torch tensor's numpy view; anything else as it is."""
    if hasattr(x, "numpy"):
        return x.detach().numpy() if hasattr(x, "detach") else x.numpy()
    return x


def floats(x) -> np.ndarray:
    """``x`` (numpy, list, or a CPU torch tensor) as a float64 array."""
    return np.asarray(_host(x), dtype=np.float64)


def ints(x) -> np.ndarray:
    """``x`` as an int64 array."""
    return np.asarray(_host(x), dtype=np.int64)


def unit(x: np.ndarray) -> np.ndarray:
    """``x`` clipped to [0, 1] (``np.clip`` costs several times the two ufuncs)."""
    return np.minimum(np.maximum(x, 0.0), 1.0)


def repeated(x: np.ndarray, n: int) -> np.ndarray:
    """``x`` (1-D) n times over (batch 1 needs no copy)."""
    return x if n == 1 else np.tile(x, n)


def widened(x: np.ndarray, w: int) -> np.ndarray:
    """[R, k] -> [R, w] with zeros after column k."""
    if x.shape[1] == w:
        return x
    out = np.zeros((x.shape[0], w))
    out[:, :x.shape[1]] = x
    return out


def known(x: np.ndarray) -> np.ndarray:
    """``x`` with NaN (not measured yet) as 0."""
    return np.where(np.isnan(x), 0.0, x)
