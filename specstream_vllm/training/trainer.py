"""Stream trainer (Eq. 5 of the paper) over self-distilled sequences.

Lossless mode: the base model is frozen; the only trainable tensors are the stream
embeddings and the stream-only LoRA (:class:`StreamParams`), and alpha0 = 0. The main
pass runs under ``no_grad`` and its stream-layer inputs can be cached in RAM across
epochs; stream positions are subsampled per sequence; the LM head + loss is chunked.

Fine-tuned mode: one peft LoRA shared by main and streams, alpha0 = 1, alpha_j = 0.1;
at the end the LoRA is merged and a full model directory is saved with the streams in
its ``specstream/`` subfolder.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import (DRAFT_VOCAB_KEY, STREAMS_SUBDIR, GreedyProposal, SpeculatorsInfo,
                          StreamCheckpointConfig, base_model_ref, reads_tokens, save_checkpoint)
from ..families import check_lora_targets, family_of
from ..reference.streams import (MainPass, StreamParams, capture_layer_inputs, check_architecture,
                                 decoder_of, stream_logits, teacher_tokens, unwrap_causal_lm)
from .data import Example
from .losses import chunked_lm_loss
from .recipe import Recipe, dump_recipe

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_NAME = "trainer_state.pt"


# --------------------------------------------------------------------------- data

@dataclass
class Seq:
    ids: torch.Tensor  # [T]
    prompt_len: int

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def to_sequences(examples: list[Example], seq_len: int) -> list[Seq]:
    """Prompt + self-distilled response, cut to ``seq_len``; drops sequences without at
    least one anchor (an anchor t >= prompt_len - 1 needs x_{t+2})."""
    out = []
    for ex in examples:
        toks = ex.tokens[:seq_len]
        p = len(ex.prompt_ids)
        if p < 1 or len(toks) < p + 2:
            continue
        out.append(Seq(torch.tensor(toks, dtype=torch.long), p))
    return out


def epoch_batches(seqs: list[Seq], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar-length sequences (less padding), deterministic per epoch."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(len(seqs), generator=g).tolist()
    group = batch_size * 16
    batches = []
    for s in range(0, len(perm), group):
        chunk = sorted(perm[s:s + group], key=lambda i: seqs[i].length)
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def sample_anchors(seqs: list[Seq], num: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, A]`` anchor positions on response tokens and their validity mask."""
    anchors, valid = [], []
    for s in seqs:
        cand = torch.arange(s.prompt_len - 1, s.length - 2)
        if cand.numel() > num:
            cand = cand[torch.randperm(cand.numel(), generator=g)[:num]].sort().values
        k = cand.numel()
        pad = num - k if cand.numel() < num else 0
        anchors.append(torch.cat([cand, cand[:1].repeat(pad)]) if pad else cand)
        valid.append(torch.cat([torch.ones(k, dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)]))
    A = max(a.numel() for a in anchors)
    return torch.stack([a[:A] for a in anchors]), torch.stack([v[:A] for v in valid])


# --------------------------------------------------------------------------- model

def load_base_model(base_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    check_architecture(model.config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_main(model, ids: torch.Tensor, mask: torch.Tensor | None, layer_ids,
             need_final: bool) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Inputs of the stream layers and (optionally) the final-normed hidden states."""
    with capture_layer_inputs(model, layer_ids) as store:
        out = decoder_of(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    return dict(store), (out.last_hidden_state if need_final else None)


class MainCache:
    """Per-sequence main-pass results, computed on first use and kept if they fit."""

    def __init__(self, model, layer_ids, need_final: bool, enabled: bool):
        self.model, self.layer_ids, self.need_final = model, list(layer_ids), need_final
        self.enabled = enabled
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def batch(self, idx: list[int], seqs: list[Seq]) -> tuple[MainPass, torch.Tensor | None]:
        missing = [i for i in idx if i not in self.store]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if missing:
            ids, mask = pad_ids([seqs[i] for i in missing])
            layers, final = run_main(self.model, ids, mask, self.layer_ids, self.need_final)
            stacked = torch.stack([layers[li] for li in self.layer_ids], dim=2)  # [B,T,L,d]
            for k, i in enumerate(missing):
                n = seqs[i].length
                fresh[i] = (stacked[k, :n].clone(), None if final is None else final[k, :n].clone())
            if self.enabled:
                self.store.update(fresh)
        got = [self.store[i] if i in self.store else fresh[i] for i in idx]
        T = max(g[0].shape[0] for g in got)
        L, d = got[0][0].shape[1:]
        lay = got[0][0].new_zeros(len(idx), T, L, d)
        fin = None if got[0][1] is None else got[0][1].new_zeros(len(idx), T, d)
        for k, (x, f) in enumerate(got):
            lay[k, :x.shape[0]] = x
            if fin is not None:
                fin[k, :f.shape[0]] = f
        pos = torch.arange(T).unsqueeze(0).expand(len(idx), T)
        main = MainPass(None, {li: lay[:, :, j] for j, li in enumerate(self.layer_ids)}, pos)
        return main, fin


def response_vocab(seqs: list[Seq]) -> torch.Tensor:
    """Sorted ids of every token in the training responses: the training softmax and,
    saved as the checkpoint's ``draft_vocab``, the tokens the proposer may draft."""
    return torch.unique(torch.cat([s.ids[s.prompt_len:] for s in seqs]))


def pad_ids(seqs: list[Seq]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(s.length for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for k, s in enumerate(seqs):
        ids[k, :s.length] = s.ids
        mask[k, :s.length] = 1
    return ids, mask


# --------------------------------------------------------------------------- trainer

@dataclass
class TrainResult:
    output_dir: Path
    checkpoint_dir: Path
    steps: int
    seconds: float
    final_loss: float
    stream_params: int
    history: list[dict]


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _param_count(params: StreamParams) -> int:
    return sum(p.numel() for p in params.parameters())


def step_batch(seqs: list[Seq], recipe: Recipe, step: int, steps_per_epoch: int):
    """The sequences of one step and their sampled anchors (deterministic in the step)."""
    epoch, k = divmod(step, steps_per_epoch)
    idx = epoch_batches(seqs, recipe.batch_size, recipe.seed, epoch)[k]
    bseqs = [seqs[i] for i in idx]
    rng = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    anchors, avalid = sample_anchors(bseqs, recipe.anchors_per_seq, rng)
    return idx, bseqs, anchors, avalid


def prepare_training_sequences(recipe: Recipe, examples, base_dir, generator, log):
    """Threads, base model path and the training sequences (data generated if needed);
    None for teacher-forced conversations, which are read as training goes."""
    if recipe.num_threads:
        torch.set_num_threads(recipe.num_threads)
    base_dir = Path(base_dir) if base_dir else recipe.resolve_base_model()
    if examples is None and recipe.data.source == "sharegpt_conversations":
        return base_dir, None
    if examples is None:
        from .data import build_sets
        examples = build_sets(base_dir, recipe.data, ["train"], generator=generator, log=log)["train"]
    return base_dir, to_sequences(examples, recipe.seq_len)


def train(recipe: Recipe, examples: list[Example] | None = None, *, resume: bool = False,
          generator=None, log: Callable[[str], None] = print, progress: bool = True,
          base_dir: Path | None = None) -> TrainResult:
    """Train streams per ``recipe``. ``examples`` defaults to the cached/generated
    self-distilled ShareGPT train set."""
    from tqdm.auto import tqdm

    t_start = time.time()
    base_dir, seqs = prepare_training_sequences(recipe, examples, base_dir, generator, log)
    streaming = seqs is None
    if not streaming and not seqs:
        raise ValueError("no usable training sequences (each needs a prompt and >= 2 response tokens)")
    out_dir = Path(recipe.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_recipe(recipe, out_dir / "recipe.yaml")

    torch.manual_seed(recipe.seed)
    model = load_base_model(base_dir, _DTYPES[recipe.dtype])
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
    form = dict(stream_input=recipe.stream_input,
                token_map_rank=recipe.token_map_rank if reads_tokens(recipe.stream_input) else None)
    params = StreamParams(cfg, recipe.num_streams, recipe.num_stream_layers,
                          None if finetuned else recipe.lora, init_std=recipe.embedding_init_std,
                          **form)
    params.to(torch.float32)
    init_manifest = _init_params(params, cfg, recipe, out_dir, resume, log)
    trainable = list(params.parameters())
    if finetuned:
        trainable += [p for p in model.parameters() if p.requires_grad]
    n_stream = _param_count(params)
    n_trainable = sum(p.numel() for p in trainable)
    tf_data, main_model = None, None
    if streaming and recipe.main_dtype and recipe.main_dtype != recipe.dtype:
        main_model = load_base_model(base_dir, _DTYPES[recipe.main_dtype])
    if streaming:
        from transformers import AutoTokenizer
        from .teacher_forced import TeacherForcedData
        st_path = out_dir / STATE_NAME
        prior = None
        if resume and st_path.is_file():
            st0 = torch.load(st_path, weights_only=False)
            prior = st0.get("data")
            if st0["params"].get("draft_vocab") is not None:
                params.set_draft_vocab(st0["params"]["draft_vocab"])
        prior = prior or init_manifest or {}
        tf_data = TeacherForcedData.open(recipe, base_dir, AutoTokenizer.from_pretrained(str(base_dir)),
                                         cursor=prior.get("conversations_consumed", 0),
                                         window=prior.get("window", 0),
                                         vocab=params.draft_vocab, log=log)
        tf_data.tokens_seen = prior.get("tokens_seen", 0)
        tf_data.anchors_seen = prior.get("anchors_seen", 0)
        tf_data.segments = list(prior.get("segments", []))
        params.set_draft_vocab(tf_data.vocab)
        fresh = init_manifest is None and not (resume and st_path.is_file())
        if fresh and params.next_token_aware and recipe.token_map_fit_conversations:
            from .teacher_forced import fit_token_map
            fit_token_map(model, params, tf_data, recipe, recipe.token_map_fit_conversations,
                          main_model, log=log)
        log(f"[train] teacher-forced conversations from #{tf_data.stream.cursor:,} "
            f"({tf_data.tokens_seen:,} tokens seen before); mode={recipe.mode}; "
            f"stream params {n_stream:,}; trainable {n_trainable:,}")
    else:
        log(f"[train] {len(seqs)} sequences, {sum(s.length for s in seqs)} tokens; mode={recipe.mode}; "
            f"stream params {n_stream:,}; trainable {n_trainable:,}")

    groups = [{"params": [params.stream_embeddings], "lr": recipe.embedding_lr or recipe.lr}]
    special = {id(params.stream_embeddings)}
    if params.next_token_aware:
        groups.append({"params": [params.token_map_A, params.token_map_B],
                       "lr": recipe.token_map_lr or recipe.lr})
        special |= {id(params.token_map_A), id(params.token_map_B)}
    groups.append({"params": [p for p in trainable if id(p) not in special], "lr": recipe.lr})
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if streaming:
        steps_per_epoch = max(1, tf_data.stream.windows_remaining() // recipe.batch_size)
        total = steps_per_epoch
    else:
        steps_per_epoch = math.ceil(len(seqs) / recipe.batch_size)
        total = math.ceil(recipe.epochs * steps_per_epoch)
    if recipe.max_steps:
        total = min(total, recipe.max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, total))

    step, elapsed_before, history = 0, 0.0, []
    state_path = out_dir / STATE_NAME
    if resume and state_path.is_file():
        st = torch.load(state_path, weights_only=False)
        params.set_draft_vocab(st["params"].get("draft_vocab"))
        params.load_state_dict(st["params"])
        if finetuned and st.get("peft") is not None:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(model, st["peft"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, elapsed_before, history = st["step"], st["elapsed"], st.get("history", [])
        log(f"[train] resumed from {state_path} at step {step}")
        if streaming:  # a resumed stream run goes on for max_steps / the budget more
            total = step + (recipe.max_steps or steps_per_epoch)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, total))
            sched.last_epoch = step

    # main-pass cache across epochs (lossless only: the main pass does not change)
    layer_ids = list(params.layer_ids)
    d = cfg.hidden_size
    per_tok = (len(layer_ids) + (1 if recipe.distill else 0)) * d * model.dtype.itemsize
    est_gib = 0.0 if streaming else sum(s.length for s in seqs) * per_tok / 2 ** 30
    use_cache = (not streaming and recipe.cache_main_pass and not finetuned and recipe.epochs > 1
                 and est_gib <= recipe.cache_max_gib)
    if not streaming:
        log(f"[train] main-pass cache {'on' if use_cache else 'off'} (~{est_gib:.2f} GiB needed)")
    cache = MainCache(model, layer_ids, recipe.distill, use_cache) if not (finetuned or streaming) else None

    weights = recipe.stream_weights()
    alpha0 = recipe.main_weight()
    lm_weight = unwrap_causal_lm(model).lm_head.weight
    lm_bias = unwrap_causal_lm(model).lm_head.bias  # Phi's LM head has one; None elsewhere
    vocab_map = None
    if streaming:
        lm_weight = lm_weight[params.draft_vocab].contiguous()
        lm_bias = None if lm_bias is None else lm_bias[params.draft_vocab]
        log(f"[train] training softmax over the {params.draft_vocab.numel():,}-token draft vocabulary")
    elif recipe.train_vocab == "data" and not finetuned:
        vocab = response_vocab(seqs)
        params.set_draft_vocab(vocab)  # drafts are chosen from the tokens the streams learn
        vocab_map = torch.full((lm_weight.shape[0],), -1, dtype=torch.long)
        vocab_map[vocab] = torch.arange(vocab.numel())
        lm_weight = lm_weight[vocab].contiguous()
        lm_bias = None if lm_bias is None else lm_bias[vocab]
        log(f"[train] training softmax over the {vocab.numel():,} tokens of the training responses")
    g = recipe.num_streams
    bar = tqdm(total=total, initial=step, disable=not progress, dynamic_ncols=True, desc="train")
    ema_loss, ema_acc = None, [None] * g
    budget = recipe.time_budget_minutes * 60 if recipe.time_budget_minutes else None
    stopped_early = False
    t_loop = time.time()
    log_f = open(out_dir / "train_log.jsonl", "a")

    seg = {"start_step": step, "start_conversation": tf_data.stream.cursor if streaming else None,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if streaming:
        tf_data.segments.append(seg)

    def save_state():
        if streaming:
            seg.update(end_step=step, end_conversation=tf_data.stream.cursor,
                       seconds=round(time.time() - t_loop, 1), tokens_seen=tf_data.tokens_seen)
            tf_data.write_manifest(recipe, out_dir)
        st = {"step": step, "params": params.state_dict(), "opt": opt.state_dict(),
              "sched": sched.state_dict(), "elapsed": elapsed_before + time.time() - t_loop,
              "history": history, "data": tf_data.manifest(recipe) if streaming else None}
        if finetuned:
            from peft import get_peft_model_state_dict
            st["peft"] = get_peft_model_state_dict(model)
        tmp = state_path.with_suffix(".tmp")
        torch.save(st, tmp)
        os.replace(tmp, state_path)

    while step < total:
        if streaming:
            from .teacher_forced import tf_step
            res = tf_step(model, params, tf_data, recipe, lm_weight, step, main_model, lm_bias)
            if res is None:
                log("[train] every training conversation has been used")
                break
            loss, correct, valid = res
        else:
            loss, correct, valid = _fixed_data_step(
                recipe, model, params, seqs, cache, step, steps_per_epoch, finetuned, layer_ids,
                lm_weight, vocab_map, weights, alpha0, d, g, lm_bias)
        _optimize(loss, opt, sched, trainable, recipe.grad_clip)
        step += 1
        if budget is not None and recipe.schedule_by_time:
            frac = (elapsed_before + time.time() - t_loop) / budget
            tf = max(0.0, 1.0 - frac) if step >= recipe.warmup_steps else 1.0
            for grp, base_lr in zip(opt.param_groups, sched.base_lrs):
                grp["lr"] = min(grp["lr"], base_lr * tf)

        acc = [(correct[..., j][valid[..., j]].mean().item() if valid[..., j].any() else float("nan"))
               for j in range(g)]
        lv = loss.item()
        ema_loss = lv if ema_loss is None else 0.9 * ema_loss + 0.1 * lv
        ema_acc = [a if e is None else (e if math.isnan(a) else 0.9 * e + 0.1 * a)
                   for a, e in zip(acc, ema_acc)]
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc="/".join(f"{a:.2f}" for a in ema_acc),
                        refresh=False)
        rec = {"step": step, "loss": round(lv, 5), "acc": [round(a, 4) for a in acc],
               "lr": opt.param_groups[0]["lr"], "time": round(elapsed_before + time.time() - t_loop, 1)}
        log_f.write(json.dumps(rec) + "\n")
        if step % recipe.log_every == 0 or step == total:
            history.append({"step": step, "loss_ema": round(ema_loss, 5),
                            "acc_ema": [round(a, 4) for a in ema_acc], "time": rec["time"]})
            log_f.flush()
        snap = recipe.snapshot_every and step % recipe.snapshot_every == 0
        if (step % recipe.checkpoint_every == 0 or snap) and step < total:
            save_state()
            ck = _export(recipe, model, params, base_dir, out_dir, step, history, n_stream,
                         elapsed_before + time.time() - t_loop, final=False)
            if snap and recipe.mode == "lossless":
                _snapshot(ck, out_dir / "snapshots" / f"step-{step:05d}")
        if budget is not None and elapsed_before + time.time() - t_loop > budget:
            log(f"[train] time budget of {recipe.time_budget_minutes} min reached at step {step}/{total}")
            stopped_early = True
            break
    bar.close()
    log_f.close()
    seconds = elapsed_before + time.time() - t_loop
    save_state()
    ckpt = _export(recipe, model, params, base_dir, out_dir, step, history, n_stream, seconds,
                   final=True, stopped_early=stopped_early, total_steps=total,
                   wall=time.time() - t_start)
    log(f"[train] done: {step} steps in {seconds / 60:.1f} min; checkpoint {ckpt}")
    return TrainResult(out_dir, ckpt, step, seconds, ema_loss or float("nan"), n_stream, history)



def _fixed_data_step(recipe: Recipe, model, params: StreamParams, seqs: list[Seq], cache, step: int,
                     steps_per_epoch: int, finetuned: bool, layer_ids, lm_weight, vocab_map,
                     weights, alpha0: float, d: int, g: int, lm_bias=None):
    """Loss, correctness and validity ``[B, A, g]`` of one step on the (cached) fixed data set."""
    idx, bseqs, anchors, avalid = step_batch(seqs, recipe, step, steps_per_epoch)
    lens = torch.tensor([s.length for s in bseqs])
    ids, mask = pad_ids(bseqs)
    main_loss = torch.zeros(())
    if finetuned:
        model.train()
        layers, final = run_main(model, ids, mask, layer_ids, True)
        main = MainPass(None, layers, torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids))
        # main stream: position t predicts x_{t+1}, on response tokens only
        T = ids.shape[1]
        t = torch.arange(T - 1)
        plen = torch.tensor([s.prompt_len for s in bseqs])
        ok = (t[None] >= plen[:, None] - 1) & (t[None] < lens[:, None] - 1)
        w = ok.float() / ok.sum().clamp(min=1)
        ml, _ = chunked_lm_loss(final[:, :-1].reshape(-1, d), lm_weight,
                                ids[:, 1:].reshape(-1), w.reshape(-1), recipe.lm_head_chunk,
                                bias=lm_bias)
        main_loss = alpha0 * ml
    else:
        main, final = cache.batch(idx, seqs)
    # token-reading streams see x_{t+1} (next_token) or x_{t+1..t+g} (chain)
    nxt = teacher_tokens(params, ids, anchors, g)
    hidden = stream_logits(model, params, main, anchors, g, return_hidden=True,
                           next_tokens=nxt)  # [B,A,g,d]
    B, A = anchors.shape
    js = torch.arange(1, g + 1)
    lab_pos = anchors[:, :, None] + 1 + js  # [B,A,g]
    valid = avalid[:, :, None] & (lab_pos < lens[:, None, None])
    lab_pos_c = torch.minimum(lab_pos, (lens - 1)[:, None, None])
    labels = torch.gather(ids, 1, lab_pos_c.reshape(B, -1)).reshape(B, A, g)
    if vocab_map is not None:
        labels = vocab_map[labels]
        valid = valid & (labels >= 0)
        labels = labels.clamp(min=0)
    counts = valid.sum(dim=(0, 1)).clamp(min=1).float()  # per stream
    wts = valid.float() * (torch.tensor(weights) / counts)[None, None, :]
    target_h = None
    if recipe.distill:
        tpos = torch.minimum(anchors[:, :, None] + js, (lens - 1)[:, None, None])
        bidx = torch.arange(B)[:, None, None].expand_as(tpos)
        target_h = final[bidx, tpos].reshape(-1, d)
    sl, correct = chunked_lm_loss(hidden.reshape(-1, d), lm_weight, labels.reshape(-1),
                                  wts.reshape(-1), recipe.lm_head_chunk, target_h, bias=lm_bias)
    loss = sl + main_loss
    return loss, correct.reshape(B, A, g), valid


def _snapshot(ckpt_dir: Path, dest: Path) -> None:
    import shutil
    from .teacher_forced import MANIFEST_NAME
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", MANIFEST_NAME):
        if (ckpt_dir / name).is_file():
            shutil.copy2(ckpt_dir / name, dest / name)


def _optimize(loss, opt, sched, trainable, grad_clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    opt.step()
    sched.step()


def _init_params(params: StreamParams, model_config, recipe: Recipe, out_dir: Path, resume: bool,
                 log) -> dict | None:
    """Start from a checkpoint's tensors: ``recipe.init_from``, or with ``--resume`` the
    checkpoint in ``out_dir`` when no trainer state is there (e.g. a committed checkpoint).
    Returns that checkpoint's data manifest (teacher-forced cursor), if any."""
    from ..checkpoint import load_checkpoint, resolve_checkpoint_dir
    from .teacher_forced import read_manifest

    src = recipe.init_from
    if src is None and resume and not (out_dir / STATE_NAME).is_file() \
            and (resolve_checkpoint_dir(out_dir) / "config.json").is_file():
        src = str(out_dir)
    if src is None:
        return None
    cfg, tensors = load_checkpoint(src)
    widen = _lora_widening(cfg.lora, params.lora)
    # next_token <-> chain keeps every tensor and stream 1's function (both read x_{t+1})
    switch = {cfg.stream_input, params.stream_input} == {"next_token", "chain"}
    if (params.stream_input if switch else cfg.stream_input, cfg.num_streams, cfg.num_stream_layers) != (
            params.stream_input, params.num_streams, params.num_stream_layers) or \
            (cfg.token_map_rank or None) != params.token_map_rank or (cfg.lora != params.lora
                                                                      and not widen):
        from ..errors import ConfigError
        raise ConfigError(f"cannot start from {src}: its streams (input {cfg.stream_input}, "
                          f"{cfg.num_streams} streams, {cfg.num_stream_layers} layers, lora {cfg.lora}) "
                          "differ from the recipe's; use a matching recipe (only a higher LoRA "
                          "rank on the same targets may differ, and next_token and chain streams "
                          "may continue in the other of those two forms)")
    if widen:
        tensors = _widen_lora(tensors, cfg.lora, params)
        cfg = cfg.model_copy(update={"lora": params.lora})
        log(f"[train] LoRA rank {cfg.lora.rank} from {src}'s rank {widen}: new directions start "
            "at zero, the streams' function is unchanged")
    if switch:
        log(f"[train] {src}'s {cfg.stream_input} streams continue as {params.stream_input} streams: "
            f"stream j now reads {'x_{t+j}' if params.chain else 'x_{t+1}'} (stream 1 unchanged)")
        cfg = cfg.model_copy(update={"stream_input": params.stream_input})
    loaded = StreamParams.from_checkpoint(model_config, cfg, tensors)
    params.load_state_dict(loaded.state_dict(), strict=False)
    params.set_draft_vocab(loaded.draft_vocab)
    log(f"[train] starting from the streams of {src}")
    return read_manifest(resolve_checkpoint_dir(src)) or {}

def _lora_widening(old, new) -> int | None:
    """The old rank when ``new`` is ``old`` with a higher rank (same targets), else None."""
    if old is None or new is None or new.rank <= old.rank:
        return None
    if list(old.target_modules) != list(new.target_modules):
        return None
    return old.rank


def _widen_lora(tensors: dict, old, params: StreamParams) -> dict:
    """A checkpoint's LoRA at ``params``' higher rank, computing the same function: the old
    A rows and B columns kept (B rescaled for the new alpha/rank scaling), new A rows from
    the fresh initialisation in ``params``, new B columns zero (as a LoRA starts)."""
    out, fresh = dict(tensors), params.state_tensors()
    r, ratio = old.rank, old.scaling / params.lora.scaling
    for key, t in tensors.items():
        if key.endswith(".lora_A"):
            out[key] = fresh[key].clone()
            out[key][:r] = t
        elif key.endswith(".lora_B"):
            out[key] = torch.zeros_like(fresh[key])
            out[key][:, :r] = t * ratio
    return out


def _export(recipe: Recipe, model, params: StreamParams, base_dir: Path, out_dir: Path, step: int,
            history: list[dict], n_stream: int, seconds: float, final: bool,
            stopped_early: bool = False, total_steps: int | None = None,
            wall: float | None = None) -> Path:
    meta = {"recipe": recipe.model_dump(mode="json"), "steps": step, "total_steps": total_steps,
            "train_seconds": round(seconds, 1), "wall_seconds": None if wall is None else round(wall, 1),
            "stream_parameters": n_stream, "final": final, "stopped_early": stopped_early,
            "last": history[-1] if history else None, "torch": torch.__version__}
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
    tensors = {k: v if k == DRAFT_VOCAB_KEY else v.float() for k, v in params.state_tensors().items()}
    return save_checkpoint(target, cfg, tensors)
