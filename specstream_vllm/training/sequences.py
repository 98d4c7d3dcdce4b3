"""Self-distilled sequences as a data source: prompt + the base model's own answer.

A fixed set trained for ``epochs``; per step a batch of similar-length sequences and a
sample of anchor positions on their answers. In lossless mode the main pass does not
change, so its stream-layer inputs may be kept across epochs (:class:`MainCache`); in
fine-tuned mode the shared LoRA changes it, so it runs (with grad) every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..reference.streams import MainPass, main_pass, teacher_tokens
from .data import Example
from .losses import chunked_lm_loss
from .parallel import shard
from .recipe import Recipe
from .source import StepOutput, Trainee, restricted_head


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


def step_batch(seqs: list[Seq], recipe: Recipe, step: int, steps_per_epoch: int,
               ranks=None):
    """The sequences of one step and their sampled anchors (deterministic in the step).
    Under torchrun the global batch is ``batch_size`` x world size, split across ranks."""
    world, rank = (ranks.world_size, ranks.rank) if ranks is not None else (1, 0)
    epoch, k = divmod(step, steps_per_epoch)
    idx = epoch_batches(seqs, recipe.batch_size * world, recipe.seed, epoch)[k]
    if ranks is not None:
        idx = shard(idx, ranks) or idx[-1:]
    bseqs = [seqs[i] for i in idx]
    rng = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step + 7_919_000 * rank)
    anchors, avalid = sample_anchors(bseqs, recipe.anchors_per_seq, rng)
    return idx, bseqs, anchors, avalid


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


class MainCache:
    """Per-sequence main-pass results on the training device, computed on first use and
    kept if they fit."""

    def __init__(self, model, layer_ids, need_final: bool, enabled: bool, device: torch.device):
        self.model, self.layer_ids, self.need_final = model, list(layer_ids), need_final
        self.enabled, self.device = enabled, device
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def batch(self, idx: list[int], seqs: list[Seq]) -> MainPass:
        missing = [i for i in idx if i not in self.store]
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if missing:
            ids, mask = (t.to(self.device) for t in pad_ids([seqs[i] for i in missing]))
            out = main_pass(self.model, ids, self.layer_ids, mask, with_logits=False,
                            with_final=self.need_final)
            stacked = torch.stack([out.layer_inputs[li] for li in self.layer_ids], dim=2)  # [B,T,L,d]
            final = out.final
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
        pos = torch.arange(T, device=self.device).unsqueeze(0).expand(len(idx), T)
        return MainPass(None, {li: lay[:, :, j] for j, li in enumerate(self.layer_ids)}, pos, fin)


class DistilledSequences:
    """A fixed set of self-distilled sequences, ``epochs`` times (see module docstring)."""

    def __init__(self, trainee: Trainee, seqs: list[Seq], log=print):
        if not seqs:
            raise ValueError("no usable training sequences (each needs a prompt and >= 2 response tokens)")
        self.t, self.seqs, self.log = trainee, seqs, log
        r = trainee.recipe
        self.steps_per_epoch = math.ceil(len(seqs) / (r.batch_size * trainee.ranks.world_size))
        self.vocab_map: Optional[torch.Tensor] = None
        self.lm_weight = self.lm_bias = None
        self.cache = None
        if not trainee.finetuned:
            layer_ids = list(trainee.params.layer_ids)
            d = trainee.model.config.hidden_size
            per_tok = (len(layer_ids) + (1 if r.distill else 0)) * d * trainee.model.dtype.itemsize
            est_gib = sum(s.length for s in seqs) * per_tok / 2 ** 30
            use = r.cache_main_pass and r.epochs > 1 and est_gib <= r.cache_max_gib
            log(f"[train] main-pass cache {'on' if use else 'off'} (~{est_gib:.2f} GiB needed)")
            self.cache = MainCache(trainee.model, layer_ids, r.distill, use, trainee.device)

    def describe(self) -> str:
        return f"{len(self.seqs)} sequences, {sum(s.length for s in self.seqs)} tokens"

    def plan(self, step: int, resumed: bool) -> int:
        total = math.ceil(self.t.recipe.epochs * self.steps_per_epoch)
        return min(total, self.t.recipe.max_steps) if self.t.recipe.max_steps else total

    def set_lm_head(self, log) -> None:
        t = self.t
        if t.recipe.train_vocab == "data" and not t.finetuned:
            vocab = response_vocab(self.seqs)
            t.params.set_draft_vocab(vocab)  # drafts are chosen from the tokens the streams learn
            rows = restricted_head(t.model, None)[0].shape[0]
            self.vocab_map = torch.full((rows,), -1, dtype=torch.long, device=t.device)
            self.vocab_map[vocab.to(t.device)] = torch.arange(vocab.numel(), device=t.device)
            log(f"[train] training softmax over the {vocab.numel():,} tokens of the training responses")
            self.lm_weight, self.lm_bias = restricted_head(t.model, vocab)
        else:
            self.lm_weight, self.lm_bias = restricted_head(t.model, None)

    def state(self) -> Optional[dict]:
        return None

    def begin_segment(self, step: int) -> None:
        pass

    def on_save(self, out_dir: Path, step: int, seconds: float) -> None:
        pass

    def step(self, step: int) -> StepOutput:
        t, r = self.t, self.t.recipe
        dev, g = t.device, r.num_streams
        idx, bseqs, anchors, avalid = step_batch(self.seqs, r, step, self.steps_per_epoch, t.ranks)
        lens_cpu = torch.tensor([s.length for s in bseqs])
        ids, mask = pad_ids(bseqs)
        ids, mask, lens = ids.to(dev), mask.to(dev), lens_cpu.to(dev)
        anchors, avalid = anchors.to(dev), avalid.to(dev)
        main_loss = torch.zeros((), device=dev)
        if t.finetuned:
            t.model.train()
            main = main_pass(t.model, ids, list(t.params.layer_ids), mask, with_logits=False,
                             with_final=True)
            main_loss = r.main_weight() * self._main_stream_loss(main.final, ids, lens, bseqs)
        else:
            main = self.cache.batch(idx, self.seqs)
        d = main.layer_inputs[t.params.first_layer].shape[-1]
        # token-reading streams see x_{t+1} (next_token) or x_{t+1..t+g} (chain)
        nxt = teacher_tokens(t.params, ids, anchors, g)
        hidden = t.forward(main, anchors, g, nxt)  # [B, A, g, d]
        B, A = anchors.shape
        js = torch.arange(1, g + 1, device=dev)
        lab_pos = anchors[:, :, None] + 1 + js  # [B, A, g]
        valid = avalid[:, :, None] & (lab_pos < lens[:, None, None])
        lab_pos_c = torch.minimum(lab_pos, (lens - 1)[:, None, None])
        labels = torch.gather(ids, 1, lab_pos_c.reshape(B, -1)).reshape(B, A, g)
        if self.vocab_map is not None:
            labels = self.vocab_map[labels]
            valid = valid & (labels >= 0)
            labels = labels.clamp(min=0)
        counts = valid.sum(dim=(0, 1)).clamp(min=1).float()  # per stream
        wts = valid.float() * (t.stream_weights() / counts)[None, None, :]
        target_h = None
        if r.distill:
            tpos = torch.minimum(anchors[:, :, None] + js, (lens - 1)[:, None, None])
            bidx = torch.arange(B, device=dev)[:, None, None].expand_as(tpos)
            target_h = main.final[bidx, tpos].reshape(-1, d)
        sl, correct = chunked_lm_loss(hidden.reshape(-1, d), self.lm_weight, labels.reshape(-1),
                                      wts.reshape(-1), r.lm_head_chunk, target_h, bias=self.lm_bias)
        return StepOutput(sl + main_loss, correct.reshape(B, A, g), valid, int(lens_cpu.sum()))

    def _main_stream_loss(self, final, ids, lens, bseqs) -> torch.Tensor:
        """Fine-tuned mode's main stream: position t predicts x_{t+1}, on answer tokens only."""
        T, d = ids.shape[1], final.shape[-1]
        t = torch.arange(T - 1, device=ids.device)
        plen = torch.tensor([s.prompt_len for s in bseqs], device=ids.device)
        ok = (t[None] >= plen[:, None] - 1) & (t[None] < lens[:, None] - 1)
        w = ok.float() / ok.sum().clamp(min=1)
        loss, _ = chunked_lm_loss(final[:, :-1].reshape(-1, d), self.lm_weight,
                                  ids[:, 1:].reshape(-1), w.reshape(-1), self.t.recipe.lm_head_chunk,
                                  bias=self.lm_bias)
        return loss
