"""Data parallel training with torchrun: one process per device, DDP over the streams.

Only the stream parameters train (the base model is frozen), so plain DDP fits: each
process holds a whole copy of the base model, runs its own share of every batch, and
DDP averages the stream gradients. Rank 0 alone writes logs, trainer state and
checkpoints, in the same format as a single process. torchrun sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; without them this is a single process and nothing here
communicates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError
from ..reference.streams import StreamParams, stream_logits


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "Ranks":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(ranks: Ranks, device: torch.device) -> None:
    """NCCL between GPUs, gloo between CPU processes (what the CPU tests use)."""
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def check_supported(ranks: Ranks, mode: str) -> None:
    if ranks.distributed and mode != "lossless":
        raise ConfigError("data parallel training (torchrun) trains lossless streams only: mode "
                          "'finetuned' also trains a LoRA inside the base model; run it as one process")


class StreamForward(nn.Module):
    """The streams' forward as a module, so DDP can wrap exactly the stream parameters:
    the base model is held outside the module's parameters (not broadcast, not reduced)."""

    def __init__(self, model: nn.Module, params: StreamParams):
        super().__init__()
        self.params = params
        self._model = [model]  # a list: not registered as a submodule

    def forward(self, main, anchors: torch.Tensor, num_streams: int,
                next_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return stream_logits(self._model[0], self.params, main, anchors, num_streams,
                             return_hidden=True, next_tokens=next_tokens)


def wrap(forward: StreamForward, ranks: Ranks, device: torch.device) -> nn.Module:
    """DDP around the stream forward when several processes train, else the module itself.
    DDP broadcasts rank 0's parameters here, so every rank starts from the same streams."""
    if not ranks.distributed:
        return forward
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True when any rank says True (a stop every rank must take together)."""
    if not ranks.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(value: int, ranks: Ranks, device: torch.device) -> int:
    if not ranks.distributed:
        return value
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def shard(items: list, ranks: Ranks) -> list:
    """This rank's share of a global batch (every rank holds the same global batch)."""
    return items[ranks.rank::ranks.world_size] if ranks.distributed else items
