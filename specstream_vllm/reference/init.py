"""Create an untrained stream checkpoint for a base model (tests, smoke runs)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from ..checkpoint import LoraSpec, StreamCheckpointConfig, base_model_ref, reads_tokens, save_checkpoint
from .streams import StreamParams, check_architecture


def init_checkpoint(base_model_dir: str | Path, out_dir: str | Path, *, num_streams: int = 4,
                    num_stream_layers: int = 4, lora: LoraSpec | None = None, seed: int = 0,
                    init_std: float = 0.02, random_lora_b: bool = False,
                    draft_vocab: list[int] | None = None, stream_input: str = "paper",
                    token_map_rank: int | None = None) -> Path:
    """Random stream embeddings (and LoRA; B zero unless ``random_lora_b``, which also
    randomises g's B in the next-token-aware form), optionally with a draft vocabulary
    (token ids drafts are restricted to)."""
    cfg = AutoConfig.from_pretrained(str(base_model_dir))
    check_architecture(cfg)
    torch.manual_seed(seed)
    if reads_tokens(stream_input) and token_map_rank is None:
        token_map_rank = 8
    params = StreamParams(cfg, num_streams, num_stream_layers, lora, init_std=init_std,
                          stream_input=stream_input, token_map_rank=token_map_rank)
    if random_lora_b:
        with torch.no_grad():
            for b in params.lora_B.values():
                b.normal_(0, 0.02)
            if params.next_token_aware:
                params.token_map_B.normal_(0, init_std)
    if draft_vocab is not None:
        params.set_draft_vocab(torch.tensor(draft_vocab))
    ckpt = StreamCheckpointConfig(
        draft_vocab_size=None if params.draft_vocab is None else params.draft_vocab.numel(),
        num_streams=num_streams, num_stream_layers=num_stream_layers, lora=lora,
        stream_input=stream_input, token_map_rank=params.token_map_rank,
        base_model=base_model_ref(base_model_dir), training={"untrained": True, "seed": seed})
    return save_checkpoint(out_dir, ckpt, params.state_tensors())
