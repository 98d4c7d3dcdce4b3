"""The trainer's checkpoints: the stream checkpoint it exports (with its training
record), snapshots, and where a run's streams start (``init_from``, a committed
checkpoint, a lower LoRA rank widened, fewer stream layers kept from more).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..checkpoint import (DRAFT_VOCAB_KEY, STREAMS_SUBDIR, TOKEN_MAP_A_KEY, TOKEN_MAP_B_KEY,
                          GreedyProposal, SpeculatorsInfo, StreamCheckpointConfig, base_model_ref,
                          reads_tokens, save_checkpoint)
from ..reference.streams import StreamParams
from .recipe import Recipe

#: the resumable trainer state in a run's output directory
STATE_NAME = "trainer_state.pt"


def snapshot(ckpt_dir: Path, dest: Path) -> None:
    import shutil
    from .teacher_forced import MANIFEST_NAME
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", MANIFEST_NAME):
        if (ckpt_dir / name).is_file():
            shutil.copy2(ckpt_dir / name, dest / name)


class Start(NamedTuple):
    """Where a run's streams came from: the source checkpoint's data manifest
    (teacher-forced cursor; None when the streams start fresh) and whether the token map
    must be fitted anew (fresh streams, or stream layers narrowed: g maps into another
    layer's residual stream)."""
    manifest: dict | None
    refit_token_map: bool


def init_params(params: StreamParams, model_config, recipe: Recipe, out_dir: Path, resume: bool,
                 log) -> Start:
    """Start from a checkpoint's tensors: ``recipe.init_from``, or with ``--resume`` the
    checkpoint in ``out_dir`` when no trainer state is there (e.g. a committed checkpoint).
    A checkpoint with more stream layers starts one with fewer: the top layers' LoRA and the
    stream embeddings are kept, the token map is refitted at the new first stream layer."""
    from ..checkpoint import load_checkpoint, resolve_checkpoint_dir
    from .teacher_forced import read_manifest

    src = recipe.init_from
    if src is None and resume and not (out_dir / STATE_NAME).is_file() \
            and (resolve_checkpoint_dir(out_dir) / "config.json").is_file():
        src = str(out_dir)
    if src is None:
        return Start(None, True)
    cfg, tensors = load_checkpoint(src)
    widen = lora_widening(cfg.lora, params.lora)
    switch = form_switch(cfg.stream_input, params.stream_input)
    narrow = params.num_stream_layers < cfg.num_stream_layers
    if switch is None or cfg.num_streams != params.num_streams or \
            params.num_stream_layers > cfg.num_stream_layers or \
            (switch == "keep" and (cfg.token_map_rank or None) != params.token_map_rank) or \
            (cfg.lora != params.lora and not widen):
        from ..errors import ConfigError
        raise ConfigError(f"cannot start from {src}: its streams (input {cfg.stream_input}, "
                          f"{cfg.num_streams} streams, {cfg.num_stream_layers} layers, lora {cfg.lora}) "
                          "differ from the recipe's; use a matching recipe (only a higher LoRA "
                          "rank on the same targets or fewer stream layers may differ; "
                          "next_token and chain streams "
                          "may continue in the other of those two forms, and any form as paper "
                          "or anchor streams, which drop the token map)")
    if narrow:
        log(f"[train] {params.num_stream_layers} stream layers from {src}'s "
            f"{cfg.num_stream_layers}: the top layers' LoRA and the stream embeddings kept, "
            f"the streams now start at layer {params.first_layer}")
        cfg = cfg.model_copy(update={"num_stream_layers": params.num_stream_layers})
    if widen:
        tensors = widen_lora(tensors, cfg.lora, params)
        cfg = cfg.model_copy(update={"lora": params.lora})
        log(f"[train] LoRA rank {cfg.lora.rank} from {src}'s rank {widen}: new directions start "
            "at zero, the streams' function is unchanged")
    if cfg.stream_input != params.stream_input:
        if switch == "drop":
            tensors = {k: v for k, v in tensors.items() if k not in (TOKEN_MAP_A_KEY, TOKEN_MAP_B_KEY)}
        how = {"keep": f"stream j now reads {'x_{t+j}' if params.chain else 'x_{t+1}'} "
                       "(stream 1 unchanged)",
               "drop": "the token map is dropped; stream embeddings, LoRA and draft vocabulary kept",
               "same": "the same tensors"}[switch]
        if not params.attends_streams:
            how += "; they attend to the main keys <= t only"
        log(f"[train] {src}'s {cfg.stream_input} streams continue as {params.stream_input} "
            f"streams: {how}")
        cfg = cfg.model_copy(update={"stream_input": params.stream_input,
                                     "token_map_rank": params.token_map_rank})
    loaded = StreamParams.from_checkpoint(model_config, cfg, tensors)
    params.load_state_dict(loaded.state_dict(), strict=False)
    params.set_draft_vocab(loaded.draft_vocab)
    log(f"[train] starting from the streams of {src}")
    return Start(read_manifest(resolve_checkpoint_dir(src)) or {}, narrow)


def form_switch(old: str, new: str) -> str | None:
    """How a checkpoint of form ``old`` continues as ``new``: ``"keep"`` (every tensor, also the
    token map: the same form, or next_token <-> chain, where stream 1 reads x_{t+1} in both),
    ``"drop"`` (a token-reading form continued as paper or anchor streams: the token map is
    dropped, embeddings, LoRA and draft vocabulary kept), ``"same"`` (paper <-> anchor: the
    same tensors, another attention mask) or None (refused: a form that reads tokens has no
    map to start from)."""
    if old == new or {old, new} == {"next_token", "chain"}:
        return "keep"
    if reads_tokens(old) and not reads_tokens(new):
        return "drop"
    if not reads_tokens(old) and not reads_tokens(new):
        return "same"
    return None


def lora_widening(old, new) -> int | None:
    """The old rank when ``new`` is ``old`` with a higher rank (same targets), else None."""
    if old is None or new is None or new.rank <= old.rank:
        return None
    if list(old.target_modules) != list(new.target_modules):
        return None
    return old.rank


def widen_lora(tensors: dict, old, params: StreamParams) -> dict:
    """A checkpoint's LoRA at ``params``' higher rank, computing the same function: the old
    A rows and B columns kept (B rescaled for the new alpha/rank scaling), new A rows from
    the fresh initialisation in ``params``, new B columns zero (as a LoRA starts)."""
    out, fresh = dict(tensors), params.state_tensors()
    r, ratio = old.rank, old.scaling / params.lora.scaling
    for key, t in tensors.items():
        if key not in fresh:        # a layer below fewer stream layers: not loaded
            continue
        if key.endswith(".lora_A"):
            out[key] = fresh[key].clone()
            out[key][:r] = t
        elif key.endswith(".lora_B"):
            out[key] = torch.zeros_like(fresh[key])
            out[key][:, :r] = t * ratio
    return out


def export(recipe: Recipe, model, params: StreamParams, base_dir: Path, out_dir: Path, step: int,
           history: list[dict], n_stream: int, seconds: float, final: bool,
           stopped_early: bool = False, total_steps: int | None = None,
           wall: float | None = None, record: dict | None = None) -> Path:
    """Write the stream checkpoint (lossless: into ``out_dir``; fine-tuned, at the end: the
    merged model with the streams in its ``specstream/`` subfolder). Its ``training`` record
    says what was trained how: steps, seconds, and from ``record`` the device, the world
    size, the tokens seen, the throughput and the peak memory."""
    meta = {"recipe": recipe.model_dump(mode="json"), "steps": step, "total_steps": total_steps,
            "train_seconds": round(seconds, 1), "wall_seconds": None if wall is None else round(wall, 1),
            "stream_parameters": n_stream, "final": final, "stopped_early": stopped_early,
            "last": history[-1] if history else None, "torch": torch.__version__, **(record or {})}
    if recipe.mode == "finetuned" and final:
        merged_dir = out_dir / "model"
        merged = model.merge_and_unload()
        merged.save_pretrained(str(merged_dir), safe_serialization=True)
        try:
            from transformers import AutoTokenizer
            AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(merged_dir))
        except Exception:  # a base without tokenizer files (tests)
            pass
        ref = base_model_ref(merged_dir)
        meta["merged_from"] = base_model_ref(base_dir).model_dump()
        target = merged_dir / STREAMS_SUBDIR
        lora = None
    elif recipe.mode == "finetuned":
        return out_dir  # intermediate: the trainer_state.pt holds the LoRA
    else:
        ref = base_model_ref(base_dir)
        target = out_dir
        lora = recipe.lora
    cfg = StreamCheckpointConfig(mode=recipe.mode, num_streams=recipe.num_streams,
                                 num_stream_layers=recipe.num_stream_layers, lora=lora,
                                 base_model=ref, torch_dtype="float32", training=meta,
                                 speculators_config=SpeculatorsInfo(proposal_methods=[GreedyProposal(
                                     speculative_tokens=recipe.num_streams,
                                     min_draft_prob=recipe.min_draft_prob).model_dump()]),
                                 draft_vocab_size=None if params.draft_vocab is None
                                 else params.draft_vocab.numel(),
                                 stream_input=params.stream_input,
                                 token_map_rank=params.token_map_rank)
    tensors = {k: (v if k == DRAFT_VOCAB_KEY else v.float()).cpu()
               for k, v in params.state_tensors().items()}
    return save_checkpoint(target, cfg, tensors)
