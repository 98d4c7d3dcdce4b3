"""What the trainer asks of a data source, and what a source gets to compute a step.

A source turns step numbers into losses: :class:`~.sequences.DistilledSequences`
(self-distilled answers of a fixed set, epochs, optional main-pass cache) and
:class:`~.teacher_forced.TeacherForcedSource` (ShareGPT conversations read once, the
base model's own distribution as the target). The trainer owns the optimizer, the
schedule, logging and checkpoints, and never looks inside a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.nn as nn

from ..reference.streams import StreamParams
from .parallel import Ranks
from .recipe import Recipe


@dataclass
class Trainee:
    """The models a step runs and where it runs them."""
    recipe: Recipe
    model: nn.Module           # the frozen base model (peft-wrapped in finetuned mode)
    params: StreamParams
    forward: nn.Module         # the streams' forward (DDP-wrapped under torchrun)
    device: torch.device
    ranks: Ranks
    main_model: Optional[nn.Module] = None  # a second copy for the no-grad main pass (main_dtype)

    @property
    def finetuned(self) -> bool:
        return self.recipe.mode == "finetuned"

    def stream_weights(self) -> torch.Tensor:
        return torch.tensor(self.recipe.stream_weights(), device=self.device)


@dataclass
class StepOutput:
    loss: torch.Tensor     # 0-d, on the device
    correct: torch.Tensor  # [B, A, g]: the stream's top-1 equals its target's
    valid: torch.Tensor    # [B, A, g]: the (anchor, stream) pair was scored
    tokens: int            # tokens this process ran through the base model this step


class DataSource(Protocol):
    def plan(self, step: int, resumed: bool) -> int:
        """The step the run ends at, from ``step`` (where it starts)."""

    def set_lm_head(self, log) -> None:
        """Choose the training softmax's rows (the draft vocabulary), after the streams'
        state is final (initialised or resumed)."""

    def begin_segment(self, step: int) -> None:
        """A run (or a resumed part of one) starts training at ``step``."""

    def step(self, step: int) -> Optional[StepOutput]:
        """The loss of one step; None when the data ran out."""

    def state(self) -> Optional[dict]:
        """What a resumed run needs to continue on the same data (the trainer state's ``data``)."""

    def on_save(self, out_dir: Path, step: int, seconds: float) -> None:
        """Write the source's own files next to the trainer state (rank 0 only)."""


def restricted_head(model: nn.Module, vocab: Optional[torch.Tensor]
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The LM head's weight and bias (Phi's head has one), restricted to ``vocab``'s rows."""
    from ..reference.streams import unwrap_causal_lm
    head = unwrap_causal_lm(model).lm_head
    w, b = head.weight, head.bias
    if vocab is None:
        return w, b
    vocab = vocab.to(w.device)
    return w[vocab].contiguous(), None if b is None else b[vocab]
