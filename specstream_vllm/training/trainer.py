"""Stream trainer (Eq. 5 of the paper) on any device, one process or several (torchrun).

Lossless mode: the base model is frozen; the only trainable tensors are the stream
embeddings and the stream-only LoRA (:class:`StreamParams`), and alpha0 = 0. Fine-tuned
mode: one peft LoRA shared by main and streams, alpha0 = 1, alpha_j = 0.1; at the end the
LoRA is merged and a full model directory is saved with the streams in ``specstream/``.

The trainer owns the optimizer, the schedule, the log and the checkpoints; a data source
(:mod:`.source`) turns step numbers into losses. The step loop leaves the device alone:
losses and accuracies stay there and are read back once per log interval.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import reads_tokens
from ..families import check_lora_targets, family_of
from ..reference.streams import StreamParams
from .checkpoint_io import STATE_NAME, Start, export, init_params, snapshot
from .data import Example
from .device import (autocast, base_dtype, check_fits, describe, load_base_model,
                     peak_memory_bytes, resolve_device, DTYPES)
from .parallel import (Ranks, StreamForward, any_rank, check_supported, init_process_group,
                       sum_over_ranks, wrap)
from .recipe import Recipe, dump_recipe
from .sequences import DistilledSequences, prepare_training_sequences
from .source import DataSource, StepOutput, Trainee

__all__ = ["STATE_NAME", "TrainResult", "train"]


@dataclass
class TrainResult:
    output_dir: Path
    checkpoint_dir: Path
    steps: int
    seconds: float
    final_loss: float
    stream_params: int
    history: list[dict]
    tokens: int = 0
    device: str = "cpu"
    params: Optional[StreamParams] = None  # the trained streams (on the training device)


@dataclass
class Run:
    """One training run's state, as the loop and the checkpoints see it."""
    recipe: Recipe
    trainee: Trainee
    source: DataSource
    base_dir: Path
    out_dir: Path
    opt: torch.optim.Optimizer
    trainable: list
    log: Callable[[str], None]
    sched: object = None
    step: int = 0
    total: int = 0
    elapsed_before: float = 0.0
    tokens: int = 0  # every rank's, this run and the runs it resumed
    history: list[dict] = field(default_factory=list)
    t_loop: float = 0.0
    stopped_early: bool = False

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t_loop

    def record(self) -> dict:
        """Where and on how much the streams were trained (the checkpoint's training record)."""
        t = self.trainee
        return {"device": describe(t.device), "world_size": t.ranks.world_size,
                "base_dtype": str(t.model.dtype).replace("torch.", ""), "tokens": self.tokens,
                "seconds": round(self.elapsed, 3),
                "tokens_per_second": round(self.tokens / max(self.elapsed, 1e-9), 1),
                "peak_memory_gib": round(peak_memory_bytes(t.device) / 2 ** 30, 3)}


# --------------------------------------------------------------------------- setup

def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _load_models(recipe: Recipe, base_dir: Path, out_dir: Path, resume: bool, device, ranks, log):
    """The base model on the device (peft-wrapped when fine-tuned) and the streams, started
    from ``init_from`` / a committed checkpoint when there is one."""
    dtype = base_dtype(recipe.dtype, device)
    check_fits(base_dir, device, dtype)
    torch.manual_seed(recipe.seed)
    model = load_base_model(base_dir, dtype, device)
    cfg = model.config
    if recipe.num_stream_layers > cfg.num_hidden_layers:
        raise ValueError(f"num_stream_layers={recipe.num_stream_layers} exceeds the model's "
                         f"{cfg.num_hidden_layers} layers")
    if recipe.lora is not None:
        check_lora_targets(cfg, recipe.lora.target_modules)
    finetuned = recipe.mode == "finetuned"
    if finetuned:
        from peft import LoraConfig, get_peft_model
        names = family_of(cfg).peft_modules  # canonical target -> this family's module name
        model = get_peft_model(model, LoraConfig(
            r=recipe.lora.rank, lora_alpha=recipe.lora.alpha,
            target_modules=sorted({names[t] for t in recipe.lora.target_modules}),
            lora_dropout=0.0, bias="none"))
    token_map_rank = recipe.token_map_rank if reads_tokens(recipe.stream_input) else None
    params = StreamParams(cfg, recipe.num_streams, recipe.num_stream_layers,
                          None if finetuned else recipe.lora, init_std=recipe.embedding_init_std,
                          stream_input=recipe.stream_input, token_map_rank=token_map_rank)
    params.to(torch.float32)
    start = init_params(params, cfg, recipe, out_dir, resume, log)
    params.to(device)
    main_model = None
    streaming = recipe.data.source == "sharegpt_conversations"
    if streaming and recipe.main_dtype and DTYPES[recipe.main_dtype] != dtype:
        main_model = load_base_model(base_dir, DTYPES[recipe.main_dtype], device)
    trainee = Trainee(recipe, model, params, StreamForward(model, params), device, ranks, main_model)
    return trainee, start


def _open_source(trainee: Trainee, seqs, base_dir: Path, out_dir: Path, resume: bool,
                 start: Start, log) -> DataSource:
    if seqs is not None:
        return DistilledSequences(trainee, seqs, log)
    from transformers import AutoTokenizer

    from .teacher_forced import TeacherForcedData, TeacherForcedSource, fit_token_map
    recipe, params = trainee.recipe, trainee.params
    st_path = out_dir / STATE_NAME
    prior = None
    if resume and st_path.is_file():
        st0 = torch.load(st_path, weights_only=False, map_location="cpu")
        prior = st0.get("data")
        if st0["params"].get("draft_vocab") is not None:
            params.set_draft_vocab(st0["params"]["draft_vocab"])
    prior = prior or start.manifest or {}
    data = TeacherForcedData.open(recipe, base_dir, AutoTokenizer.from_pretrained(str(base_dir)),
                                  cursor=prior.get("conversations_consumed", 0),
                                  window=prior.get("window", 0), vocab=params.draft_vocab, log=log)
    data.tokens_seen = prior.get("tokens_seen", 0)
    data.anchors_seen = prior.get("anchors_seen", 0)
    data.segments = list(prior.get("segments", []))
    params.set_draft_vocab(data.vocab)
    refit = start.refit_token_map and not (resume and st_path.is_file())
    if refit and params.next_token_aware and recipe.token_map_fit_conversations:
        fit_token_map(trainee.model, params, data, recipe, recipe.token_map_fit_conversations,
                      trainee.main_model, log=log)
    return TeacherForcedSource(trainee, data, log)


def _optimizer(trainee: Trainee) -> tuple[torch.optim.Optimizer, list]:
    """AdamW (float32 state): the stream embeddings and g may have their own learning rates."""
    recipe, params = trainee.recipe, trainee.params
    trainable = list(params.parameters())
    if trainee.finetuned:
        trainable += [p for p in trainee.model.parameters() if p.requires_grad]
    groups = [{"params": [params.stream_embeddings], "lr": recipe.embedding_lr or recipe.lr}]
    special = {id(params.stream_embeddings)}
    if params.next_token_aware:
        groups.append({"params": [params.token_map_A, params.token_map_B],
                       "lr": recipe.token_map_lr or recipe.lr})
        special |= {id(params.token_map_A), id(params.token_map_B)}
    groups.append({"params": [p for p in trainable if id(p) not in special], "lr": recipe.lr})
    fused = {"fused": True} if trainee.device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay, **fused), trainable


def _restore(run: Run, resume: bool) -> None:
    """The step plan and schedule, continued from the trainer state with ``--resume``."""
    state_path = run.out_dir / STATE_NAME
    resumed = resume and state_path.is_file()
    if resumed:
        st = torch.load(state_path, weights_only=False, map_location="cpu")
        params = run.trainee.params
        params.set_draft_vocab(st["params"].get("draft_vocab"))
        params.load_state_dict(st["params"])
        if run.trainee.finetuned and st.get("peft") is not None:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(run.trainee.model, st["peft"])
        run.opt.load_state_dict(st["opt"])
        run.step, run.elapsed_before = st["step"], st["elapsed"]
        run.history, run.tokens = st.get("history", []), st.get("tokens", 0)
        run.log(f"[train] resumed from {state_path} at step {run.step}")
    run.total = run.source.plan(run.step, resumed)
    run.sched = torch.optim.lr_scheduler.LambdaLR(run.opt, _lr_lambda(run.recipe.warmup_steps, run.total))
    if resumed:
        run.sched.load_state_dict(st["sched"])
        if run.recipe.data.source == "sharegpt_conversations":  # the plan moved on: a new schedule
            run.sched = torch.optim.lr_scheduler.LambdaLR(
                run.opt, _lr_lambda(run.recipe.warmup_steps, run.total))
            run.sched.last_epoch = run.step


# --------------------------------------------------------------------------- loop

class StepLog:
    """Per-step loss and accuracy kept on the device, written to ``train_log.jsonl`` at log
    intervals (one read-back per interval, none per step), with the EMAs the progress bar
    and the history show."""

    def __init__(self, path: Optional[Path], num_streams: int):
        self.f = open(path, "a") if path is not None else None
        self.g = num_streams
        self.pending: list[tuple] = []
        self.ema_loss: Optional[float] = None
        self.ema_acc: list[Optional[float]] = [None] * num_streams
        self.tokens = 0

    def add(self, step: int, out: StepOutput, lr: float, t: float) -> None:
        hits = (out.correct * out.valid).sum(dim=(0, 1))
        self.pending.append((step, out.loss.detach(), hits, out.valid.sum(dim=(0, 1)), lr, t))
        self.tokens += out.tokens

    def flush(self) -> int:
        """Write the pending steps; returns how many were written."""
        if not self.pending:
            return 0
        losses = torch.stack([p[1] for p in self.pending]).tolist()
        hits = torch.stack([p[2] for p in self.pending]).tolist()
        counts = torch.stack([p[3] for p in self.pending]).tolist()
        for (step, _, _, _, lr, t), lv, h, c in zip(self.pending, losses, hits, counts):
            acc = [hj / cj if cj else float("nan") for hj, cj in zip(h, c)]
            self.ema_loss = lv if self.ema_loss is None else 0.9 * self.ema_loss + 0.1 * lv
            self.ema_acc = [a if e is None else (e if a != a else 0.9 * e + 0.1 * a)
                            for a, e in zip(acc, self.ema_acc)]
            if self.f is not None:
                self.f.write(json.dumps({"step": step, "loss": round(lv, 5),
                                         "acc": [round(a, 4) for a in acc], "lr": lr,
                                         "time": round(t, 1)}) + "\n")
        n = len(self.pending)
        self.pending.clear()
        if self.f is not None:
            self.f.flush()
        return n

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def _optimize(loss, opt, sched, trainable, grad_clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    opt.step()
    sched.step()


def _scale_lr_by_time(run: Run, elapsed: float, budget: float) -> None:
    """With a time budget, the LR also decays with the share of the budget spent."""
    frac = elapsed / budget
    tf = max(0.0, 1.0 - frac) if run.step >= run.recipe.warmup_steps else 1.0
    for grp, base_lr in zip(run.opt.param_groups, run.sched.base_lrs):
        grp["lr"] = min(grp["lr"], base_lr * tf)


def _save_state(run: Run) -> None:
    """The resumable trainer state (and the source's files), rank 0 only."""
    if not run.trainee.ranks.is_main:
        return
    run.source.on_save(run.out_dir, run.step, time.monotonic() - run.t_loop)
    st = {"step": run.step, "params": run.trainee.params.state_dict(), "opt": run.opt.state_dict(),
          "sched": run.sched.state_dict(), "elapsed": run.elapsed, "history": run.history,
          "data": run.source.state(), "tokens": run.tokens}
    if run.trainee.finetuned:
        from peft import get_peft_model_state_dict
        st["peft"] = get_peft_model_state_dict(run.trainee.model)
    path = run.out_dir / STATE_NAME
    tmp = path.with_suffix(".tmp")
    torch.save(st, tmp)
    os.replace(tmp, path)


def _export(run: Run, n_stream: int, final: bool, wall: float | None = None) -> Path:
    if not run.trainee.ranks.is_main:
        return run.out_dir
    return export(run.recipe, run.trainee.model, run.trainee.params, run.base_dir, run.out_dir,
                  run.step, run.history, n_stream, run.elapsed, final=final,
                  stopped_early=run.stopped_early if final else False,
                  total_steps=run.total if final else None, wall=wall, record=run.record())


def _flush(run: Run, slog: StepLog, bar) -> None:
    """Write the pending steps, count every rank's tokens, and show the throughput."""
    n = slog.flush()
    run.tokens += sum_over_ranks(slog.tokens, run.trainee.ranks, run.trainee.device)
    slog.tokens = 0
    if n:
        bar.update(n)
        tps = run.tokens / max(run.elapsed, 1e-9)
        bar.set_postfix(loss=f"{slog.ema_loss:.3f}", acc="/".join(f"{a:.2f}" for a in slog.ema_acc),
                        tok_s=f"{tps:,.0f}", refresh=False)


def _train_loop(run: Run, slog: StepLog, bar, n_stream: int) -> None:
    r, t = run.recipe, run.trainee
    budget = r.time_budget_minutes * 60 if r.time_budget_minutes else None
    agreed_elapsed = run.elapsed
    while run.step < run.total:
        with autocast(t.device, t.model.dtype):
            out = run.source.step(run.step)
        if out is None:
            run.log("[train] every training conversation has been used")
            break
        _optimize(out.loss, run.opt, run.sched, run.trainable, r.grad_clip)
        run.step += 1
        if budget is not None and r.schedule_by_time:
            _scale_lr_by_time(run, run.elapsed if not t.ranks.distributed else agreed_elapsed, budget)
        slog.add(run.step, out, run.opt.param_groups[0]["lr"], run.elapsed)
        snap = r.snapshot_every and run.step % r.snapshot_every == 0
        save = (run.step % r.checkpoint_every == 0 or snap) and run.step < run.total
        at_log = run.step % r.log_every == 0 or run.step == run.total
        if at_log or save:
            _flush(run, slog, bar)
        if at_log:
            run.history.append({"step": run.step, "loss_ema": round(slog.ema_loss, 5),
                                "acc_ema": [round(a, 4) for a in slog.ema_acc],
                                "time": round(run.elapsed, 1), "tokens": run.tokens})
        if save:
            _save_state(run)
            ck = _export(run, n_stream, final=False)
            if snap and r.mode == "lossless" and t.ranks.is_main:
                snapshot(ck, run.out_dir / "snapshots" / f"step-{run.step:05d}")
        if budget is not None:
            if t.ranks.distributed:  # every rank stops at the same step
                if at_log:
                    agreed_elapsed = run.elapsed
                    run.stopped_early = any_rank(agreed_elapsed > budget, t.ranks, t.device)
            else:
                run.stopped_early = run.elapsed > budget
            if run.stopped_early:
                run.log(f"[train] time budget of {r.time_budget_minutes} min reached at step "
                        f"{run.step}/{run.total}")
                break
    _flush(run, slog, bar)


def train(recipe: Recipe, examples: list[Example] | None = None, *, resume: bool = False,
          generator=None, log: Callable[[str], None] = print, progress: bool = True,
          base_dir: Path | None = None) -> TrainResult:
    """Train streams per ``recipe`` on ``recipe.device``. ``examples`` defaults to the
    cached/generated self-distilled ShareGPT train set (or, for teacher-forced data, the
    recipe's conversations). Under torchrun every rank calls this; rank 0 writes."""
    from tqdm.auto import tqdm

    t_start = time.time()
    ranks = Ranks.from_env()
    check_supported(ranks, recipe.mode)
    device = resolve_device(recipe.device, ranks.local_rank)
    init_process_group(ranks, device)
    if not ranks.is_main:
        log, progress = (lambda s: None), False
    base_dir, seqs = prepare_training_sequences(recipe, examples, base_dir, generator, log)
    out_dir = Path(recipe.output_dir)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, out_dir / "recipe.yaml")
    trainee, start = _load_models(recipe, base_dir, out_dir, resume, device, ranks, log)
    source = _open_source(trainee, seqs, base_dir, out_dir, resume, start, log)
    trainee.forward = wrap(trainee.forward, ranks, device)
    opt, trainable = _optimizer(trainee)
    n_stream = trainee.params.num_parameters()
    log(f"[train] {source.describe()}; mode={recipe.mode}; device {describe(device)}"
        + (f" x {ranks.world_size} processes" if ranks.distributed else "")
        + f"; stream params {n_stream:,}; trainable {sum(p.numel() for p in trainable):,}")
    run = Run(recipe, trainee, source, base_dir, out_dir, opt, trainable, log)
    _restore(run, resume)
    source.set_lm_head(log)
    source.begin_segment(run.step)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=run.total, initial=run.step, disable=not progress, dynamic_ncols=True, desc="train")
    slog = StepLog(out_dir / "train_log.jsonl" if ranks.is_main else None, recipe.num_streams)
    run.t_loop = time.monotonic()
    try:
        _train_loop(run, slog, bar, n_stream)
    finally:
        bar.close()
        slog.close()
    _save_state(run)
    ckpt = _export(run, n_stream, final=True, wall=time.time() - t_start)
    rec = run.record()
    log(f"[train] done: {run.step} steps, {run.tokens:,} tokens in {run.elapsed / 60:.1f} min "
        f"({rec['tokens_per_second']:,.0f} tokens/s, peak memory {rec['peak_memory_gib']:.2f} GiB "
        f"on {rec['device']}); checkpoint {ckpt}")
    return TrainResult(out_dir, ckpt, run.step, run.elapsed, slog.ema_loss or float("nan"), n_stream,
                       run.history, run.tokens, rec["device"], trainee.params)
