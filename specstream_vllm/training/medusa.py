"""Medusa heads baseline, trained on the same data and budget as the streams, saved in
the format of vLLM 0.32's built-in ``medusa`` method.

vLLM's ``Medusa`` (``vllm/model_executor/models/medusa.py``) applies, per head,
``x + SiLU(W x)`` (``num_hidden_layers`` times) to the target's final hidden state at
the last accepted position, then an LM head. With ``original_lm_head: true`` all heads
share one LM head, stored as ``lm_heads.0.weight``: we store the base model's own LM
head there (frozen) and train only the residual blocks (``blocks.{h}.layers.{l}.weight``).
Head k (0-based) at position t predicts x_{t+2+k}, the same offsets as stream k+1.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .data import Example
from .losses import chunked_argmax, chunked_lm_loss
from .device import CPU_DTYPES, load_base_model
from .recipe import Recipe
from .sequences import pad_ids, prepare_training_sequences, response_vocab, step_batch
from .trainer import _lr_lambda
from ..reference.streams import main_pass, unwrap_causal_lm


class MedusaHeads(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_layers: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.ModuleList([nn.Linear(hidden, hidden, bias=False) for _ in range(num_layers)])
            for _ in range(num_heads)])
        for blk in self.blocks:
            for lin in blk:
                nn.init.zeros_(lin.weight)  # identity at start: head k = the main's prediction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> ``[..., heads, d]``"""
        outs = []
        for blk in self.blocks:
            h = x
            for lin in blk:
                h = h + nn.functional.silu(lin(h))
            outs.append(h)
        return torch.stack(outs, dim=-2)


def save_medusa(path: Path, heads: MedusaHeads, lm_head: torch.Tensor, vocab_size: int,
                meta: dict, lm_dtype: torch.dtype = torch.bfloat16) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    num_heads = len(heads.blocks)
    num_layers = len(heads.blocks[0])
    tensors = {f"blocks.{h}.layers.{l}.weight": heads.blocks[h][l].weight.detach().float().contiguous()
               for h in range(num_heads) for l in range(num_layers)}
    tensors["lm_heads.0.weight"] = lm_head.detach().to(lm_dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["MedusaModel"], "model_type": "medusa",
           "hidden_size": lm_head.shape[1], "vocab_size": vocab_size, "num_heads": num_heads,
           "num_hidden_layers": num_layers, "original_lm_head": True,
           "truncated_vocab_size": vocab_size, "medusa_fc_bias": False,
           "torch_dtype": "bfloat16", "specstream_training": meta}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def medusa_param_counts(num_heads: int, num_layers: int, hidden: int, vocab: int) -> dict:
    trainable = num_heads * num_layers * hidden * hidden
    return {"trainable": trainable, "stored_including_lm_head_copy": trainable + vocab * hidden}


def load_medusa_drafter(path: str | Path, model):
    """(drafter for :func:`evaluate.acceptance_on`, num_heads, info)."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    heads = MedusaHeads(cfg["hidden_size"], cfg["num_heads"], cfg["num_hidden_layers"])
    with torch.no_grad():
        for h in range(cfg["num_heads"]):
            for l in range(cfg["num_hidden_layers"]):
                heads.blocks[h][l].weight.copy_(t[f"blocks.{h}.layers.{l}.weight"])
    dt = unwrap_causal_lm(model).lm_head.weight.dtype
    heads.to(dt)
    lm = t["lm_heads.0.weight"].to(dt)

    def draft(model, layers, final, anchors, ids=None):
        h = heads(final[0, anchors])  # [A, heads, d]
        return chunked_argmax(h.reshape(-1, h.shape[-1]), lm).view(anchors.numel(), -1)

    info = {"path": str(path), "num_heads": cfg["num_heads"],
            **medusa_param_counts(cfg["num_heads"], cfg["num_hidden_layers"], cfg["hidden_size"],
                                  cfg["vocab_size"])}
    return draft, cfg["num_heads"], info


def train_medusa(recipe: Recipe, examples: list[Example] | None = None, *, output_dir: str | Path,
                 num_heads: int | None = None, generator=None, progress: bool = True,
                 log: Callable[[str], None] = print, base_dir: Path | None = None) -> Path:
    """Train Medusa-1 heads (frozen base) with the recipe's data, steps, anchors and budget."""
    from tqdm.auto import tqdm

    base_dir, seqs = prepare_training_sequences(recipe, examples, base_dir, generator, log)
    torch.manual_seed(recipe.seed)
    model = load_base_model(base_dir, CPU_DTYPES[recipe.dtype])
    cfg = model.config
    d = cfg.hidden_size
    K = num_heads or recipe.num_streams
    heads = MedusaHeads(d, K).to(torch.float32)
    lm_weight = unwrap_causal_lm(model).lm_head.weight
    opt = torch.optim.AdamW(heads.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    spe = math.ceil(len(seqs) / recipe.batch_size)
    total = math.ceil(recipe.epochs * spe)
    if recipe.max_steps:
        total = min(total, recipe.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, total))
    weights = recipe.stream_weights()[:K] + [1.0] * max(0, K - recipe.num_streams)
    vocab_map = None
    lm_train = lm_weight.float()
    if recipe.train_vocab == "data":  # same restricted softmax as the stream trainer
        vocab = response_vocab(seqs)
        vocab_map = torch.full((lm_weight.shape[0],), -1, dtype=torch.long)
        vocab_map[vocab] = torch.arange(vocab.numel())
        lm_train = lm_train[vocab].contiguous()
    cache: dict[int, torch.Tensor] = {}
    budget = recipe.time_budget_minutes * 60 if recipe.time_budget_minutes else None
    t0 = time.time()
    step, ema = 0, None
    bar = tqdm(total=total, disable=not progress, desc="medusa", dynamic_ncols=True)
    while step < total:
        idx, bseqs, anchors, avalid = step_batch(seqs, recipe, step, spe)
        missing = [i for i in idx if i not in cache]
        if missing:
            with torch.no_grad():
                ids, mask = pad_ids([seqs[i] for i in missing])
                final = main_pass(model, ids, [], mask, with_logits=False, with_final=True).final
            for j, i in enumerate(missing):
                cache[i] = final[j, :seqs[i].length].clone()
        B, A = anchors.shape
        lens = torch.tensor([s.length for s in bseqs])
        ids, _ = pad_ids(bseqs)
        fin = torch.stack([cache[i][anchors[b]] for b, i in enumerate(idx)])  # [B, A, d]
        h = heads(fin.float())  # [B, A, K, d]
        js = torch.arange(1, K + 1)
        lab_pos = anchors[:, :, None] + 1 + js
        valid = avalid[:, :, None] & (lab_pos < lens[:, None, None])
        labels = torch.gather(ids, 1, torch.minimum(lab_pos, (lens - 1)[:, None, None]).reshape(B, -1))
        labels = labels.reshape(B, A, K)
        if vocab_map is not None:
            labels = vocab_map[labels]
            valid = valid & (labels >= 0)
            labels = labels.clamp(min=0)
        counts = valid.sum(dim=(0, 1)).clamp(min=1).float()
        wts = valid.float() * (torch.tensor(weights) / counts)[None, None, :]
        loss, correct = chunked_lm_loss(h.reshape(-1, d), lm_train, labels.reshape(-1),
                                        wts.reshape(-1), recipe.lm_head_chunk)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(heads.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        c = correct.reshape(B, A, K)
        acc = [c[..., j][valid[..., j]].mean().item() if valid[..., j].any() else 0.0 for j in range(K)]
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", acc="/".join(f"{a:.2f}" for a in acc), refresh=False)
        if budget is not None and time.time() - t0 > budget:
            log(f"[medusa] time budget reached at step {step}/{total}")
            break
    bar.close()
    counts = medusa_param_counts(K, 1, d, cfg.vocab_size)
    meta = {"steps": step, "total_steps": total, "train_seconds": round(time.time() - t0, 1),
            "loss_ema": ema, "base_model": str(base_dir), "parameters": counts,
            "recipe": recipe.model_dump(mode="json")}
    out = save_medusa(Path(output_dir), heads, lm_weight, cfg.vocab_size, meta)
    log(f"[medusa] {step} steps in {(time.time() - t0) / 60:.1f} min; trainable {counts['trainable']:,} "
        f"params (+{cfg.vocab_size * d:,} LM-head copy); saved {out}")
    return out
