"""One training step on teacher-forced conversations (see :mod:`.conversations`).

Per step: the next ``batch_size`` unseen conversations run through the frozen base model
once (no grad), which gives both the stream layers' inputs and the base model's own
next-token distribution at every position. Stream j at anchor t (x_{t+1} an assistant
token) is trained towards the base model's distribution at t+j, i.e. what the model
itself would emit as x_{t+1+j} -- the token verification accepts -- over the draft
vocabulary. Targets that would leave the assistant turn are masked (generation stops at
the end-of-turn token, so such drafts are never verified).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import next_token_features
from ..reference.streams import MainPass, StreamParams, main_pass, teacher_tokens, unwrap_causal_lm
from .conversations import (ConversationStream, EncodedConversation, frequent_tokens, load_conversations,
                            training_units)
from .losses import chunked_argmax, chunked_lm_loss
from .parallel import shard
from .recipe import Recipe
from .source import StepOutput, Trainee, restricted_head

MANIFEST_NAME = "data_manifest.json"


def assistant_runs(assistant: torch.Tensor) -> torch.Tensor:
    """``run[b, i]``: how many consecutive assistant tokens start at position i."""
    B, T = assistant.shape
    run = torch.zeros(B, T + 1, dtype=torch.long)
    for i in range(T - 1, -1, -1):
        run[:, i] = (run[:, i + 1] + 1) * assistant[:, i]
    return run[:, :T]


def sample_tf_anchors(run: torch.Tensor, lens: torch.Tensor, num: int, g: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors t whose x_{t+1} and x_{t+2} are assistant tokens, ``[B, A]`` + validity."""
    B, T = run.shape
    anchors, valid = [], []
    for b in range(B):
        t = torch.arange(0, int(lens[b]) - 2)
        cand = t[run[b, t + 1] >= 2]
        if cand.numel() > num:
            cand = cand[torch.randperm(cand.numel(), generator=g)[:num]].sort().values
        k = cand.numel()
        if k == 0:
            cand, k = torch.zeros(1, dtype=torch.long), 0
        pad = num - cand.numel() if cand.numel() < num else 0
        anchors.append(torch.cat([cand, cand[:1].repeat(pad)]))
        valid.append(torch.arange(num) < k)
    return torch.stack(anchors), torch.stack(valid)


@torch.no_grad()
def chain_consistent(valid: torch.Tensor, anchors: torch.Tensor, ids: torch.Tensor,
                     final: torch.Tensor, lm_head: torch.nn.Module, chunk: int = 1024) -> torch.Tensor:
    """``valid [B, A, g]`` kept only where stream j's draft could be verified at all: the
    data's x_{t+2} .. x_{t+j} are the base model's own greedy tokens.

    Stream j never sees x_{t+2..t+j}; inside vLLM it drafts only after streams < j were
    accepted, i.e. when those tokens are the model's greedy choices. Where the data's
    tokens differ (human or ChatGPT text the model would not have written), the model's
    distribution at t+j is conditioned on a token the stream cannot know, and training
    towards it teaches noise. Stream 1's input x_{t+1} is seen by next-token-aware
    streams and needs no agreement. Greedy = argmax over the full vocabulary of the
    main pass's final states (the rows where it matters only, one position at a time).
    """
    keep = valid.clone()
    for j in range(2, valid.shape[2] + 1):
        b, a = keep[:, :, j - 1].nonzero(as_tuple=True)   # stream j still valid so far
        if b.numel() == 0:
            break
        p = anchors[b, a] + j - 1                          # final[t+j-1] predicts x_{t+j}
        greedy = chunked_argmax(final[b, p], lm_head.weight, chunk, bias=lm_head.bias)
        bad = greedy != ids[b, p + 1]
        keep[b[bad], a[bad], j - 1:] = False
    return keep


def pad_encoded(batch: list[EncodedConversation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(e.length for e in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    asst = torch.zeros(len(batch), T, dtype=torch.bool)
    for k, e in enumerate(batch):
        ids[k, :e.length], mask[k, :e.length], asst[k, :e.length] = e.ids, 1, e.assistant
    return ids, mask, asst


@dataclass
class TeacherForcedData:
    """The conversation stream of a run, its draft vocabulary and what it has consumed."""

    stream: ConversationStream
    vocab: torch.Tensor
    tokens_seen: int = 0
    anchors_seen: int = 0
    segments: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, recipe: Recipe, base_dir: Path, tokenizer, cursor: int = 0, window: int = 0,
             vocab: torch.Tensor | None = None, log=print) -> "TeacherForcedData":
        from .data import mtbench_texts_normalized

        spec = recipe.data
        kw = dict(split="train", heldout_fraction=spec.heldout_fraction,
                  exclude_first_turns=mtbench_texts_normalized(), seed=spec.seed)
        convs = load_conversations(spec.sharegpt_file, **kw)
        more = load_conversations(spec.sharegpt_file, leading_assistant=True, **kw) if spec.second_pass else []
        units = training_units(convs, more, spec.seed) if spec.second_pass else convs
        log(f"[data] {len(convs):,} teacher-forced ShareGPT training conversations"
            + (f" (+ a second pass: their later windows and {len(more):,} conversations that open "
               f"with an assistant turn)" if spec.second_pass else "")
            + f"; starting at unit #{cursor:,}" + (f", window {window}" if window else ""))
        if vocab is None:
            # the vocabulary comes from a fixed sample that does not move with the cursor
            sample = ConversationStream(tokenizer, convs, recipe.seq_len).take(spec.vocab_sample)
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            vocab = frequent_tokens(sample, spec.draft_vocab_size, eos)
            log(f"[data] draft vocabulary: the {vocab.numel():,} most frequent assistant tokens "
                f"of {len(sample):,} conversations")
        return cls(ConversationStream(tokenizer, units, recipe.seq_len, cursor, window), vocab)

    def manifest(self, recipe: Recipe) -> dict:
        return {"source": "sharegpt_conversations", "split": "train", "order_seed": recipe.data.seed,
                "heldout_fraction": recipe.data.heldout_fraction, "seq_len": recipe.seq_len,
                "conversations_consumed": self.stream.cursor,  # units (see training_units)
                "window": self.stream.window,
                "conversations_available": len(self.stream.units),
                "second_pass": recipe.data.second_pass,
                "tokens_seen": self.tokens_seen, "anchors_seen": self.anchors_seen,
                "draft_vocab_size": int(self.vocab.numel()), "segments": self.segments}

    def write_manifest(self, recipe: Recipe, out_dir: Path) -> None:
        tmp = out_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(self.manifest(recipe), indent=2) + "\n")
        os.replace(tmp, out_dir / MANIFEST_NAME)


def read_manifest(ckpt_dir: Path) -> dict | None:
    p = Path(ckpt_dir) / MANIFEST_NAME
    return json.loads(p.read_text()) if p.is_file() else None


@torch.no_grad()
def _main_pass(model, ids, mask, layer_ids, dtype: torch.dtype):
    out = main_pass(model, ids, layer_ids, mask, with_logits=False, with_final=True)
    return {k: v.to(dtype) for k, v in out.layer_inputs.items()}, out.final


@torch.no_grad()
def fit_token_map(model, params: StreamParams, data: TeacherForcedData, recipe: Recipe,
                  num_conversations: int, main_model=None, ridge: float = 1e-2, log=print) -> None:
    """Least-squares start for g: ``g(x_{t+1}) ~ h_{t+1} - h_t`` over the first
    ``num_conversations`` of the stream (consumed: they count as seen).

    With it, stream 1's input starts close to the main state the model itself will have at
    t+1, so stream 1 begins as a fair copy of the model one step ahead (measured on SmolLM2:
    top-1 agreement with the model ~0.15-0.2 before any gradient step, against ~0.03 for a
    zero g), and training refines it. Ridge normal equations over every adjacent pair of
    positions, truncated to the map's rank by SVD.
    """
    d = params.stream_embeddings.shape[1]
    dev = params.stream_embeddings.device
    ete = torch.zeros(d, d, dtype=torch.float64, device=dev)
    etd = torch.zeros(d, d, dtype=torch.float64, device=dev)
    n = 0
    embed = model.get_input_embeddings()
    first = params.first_layer
    while n < num_conversations:
        batch = data.stream.take(min(recipe.batch_size, num_conversations - n))
        if not batch:
            break
        n += len(batch)
        ids, mask, _ = (t.to(params.stream_embeddings.device) for t in pad_encoded(batch))
        layers, _ = _main_pass(main_model or model, ids, mask, [first], torch.float32)
        h = layers[first].double()
        sel = mask[:, 1:] > 0
        dh = (h[:, 1:] - h[:, :-1])[sel]
        e = next_token_features(embed(ids[:, 1:]))[sel].double()
        ete += e.T @ e
        etd += e.T @ dh
        data.tokens_seen += int(mask.sum())
    eye = torch.eye(d, dtype=ete.dtype, device=dev)
    w = torch.linalg.solve(ete + ridge * ete.diagonal().mean() * eye, etd).T
    u, sv, vh = torch.linalg.svd(w)
    r = params.token_map_rank
    params.token_map_B.copy_((u[:, :r] * sv[:r].sqrt()).float())
    params.token_map_A.copy_((sv[:r].sqrt()[:, None] * vh[:r]).float())
    kept = float(sv[:r].pow(2).sum() / sv.pow(2).sum())
    log(f"[train] g fitted by least squares on {n} conversations (rank {r} keeps {kept:.0%} of the "
        "full map's energy)")


class TeacherForcedSource:
    """Teacher-forced conversations as the trainer's data source: one pass, no epochs.

    Per step the next ``batch_size`` unseen windows (x world size under torchrun, each
    rank taking its share) run through the frozen base model; stream j at anchor t is
    trained towards the base model's distribution at t+j over the draft vocabulary."""

    def __init__(self, trainee: Trainee, data: TeacherForcedData, log=print):
        self.t, self.data, self.log = trainee, data, log
        r = trainee.recipe
        self.steps_per_epoch = max(1, data.stream.windows_remaining()
                                   // (r.batch_size * trainee.ranks.world_size))
        self.lm_weight = self.lm_bias = None

    def describe(self) -> str:
        return (f"teacher-forced conversations from #{self.data.stream.cursor:,} "
                f"({self.data.tokens_seen:,} tokens seen before)")

    def plan(self, step: int, resumed: bool) -> int:
        r = self.t.recipe
        if resumed:  # a resumed stream run goes on for max_steps / the data left more
            return step + (r.max_steps or self.steps_per_epoch)
        return min(self.steps_per_epoch, r.max_steps) if r.max_steps else self.steps_per_epoch

    def set_lm_head(self, log) -> None:
        vocab = self.t.params.draft_vocab
        self.lm_weight, self.lm_bias = restricted_head(self.t.model, vocab)
        log(f"[train] training softmax over the {vocab.numel():,}-token draft vocabulary")

    def state(self) -> dict:
        return self.data.manifest(self.t.recipe)

    def begin_segment(self, step: int) -> None:
        import time
        self.segment = {"start_step": step, "start_conversation": self.data.stream.cursor,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "device": str(self.t.device), "world_size": self.t.ranks.world_size}
        self.data.segments.append(self.segment)

    def on_save(self, out_dir: Path, step: int, seconds: float) -> None:
        self.segment.update(end_step=step, end_conversation=self.data.stream.cursor,
                            seconds=round(seconds, 1), tokens_seen=self.data.tokens_seen)
        self.data.write_manifest(self.t.recipe, out_dir)

    def step(self, step: int) -> StepOutput | None:
        """Loss and per-(anchor, stream) correctness of one step, or None when data ran out;
        correct = the stream's top-1 equals the base model's top-1 (both over the draft
        vocabulary)."""
        t, r, data = self.t, self.t.recipe, self.data
        world = t.ranks.world_size
        batch = data.stream.take(r.batch_size * world)
        if len(batch) < world or not batch:
            return None
        tokens_all = sum(e.length for e in batch)
        batch = shard(batch, t.ranks)
        g, dev = r.num_streams, t.device
        ids, mask, asst = pad_encoded(batch)
        lens = mask.sum(1)
        tokens = int(lens.sum())
        rng = torch.Generator().manual_seed(r.seed * 1_000_003 + step + 7_919_000 * t.ranks.rank)
        run = assistant_runs(asst)
        anchors, avalid = sample_tf_anchors(run, lens, r.anchors_per_seq, rng)
        B, A = anchors.shape
        js = torch.arange(1, g + 1)
        # stream j's target: the base model at t+j; x_{t+1..t+1+j} must all be assistant tokens
        valid = avalid[:, :, None] & (run[torch.arange(B)[:, None], anchors + 1][:, :, None] >= js + 1)
        ids, mask, lens, anchors, valid = (x.to(dev) for x in (ids, mask, lens, anchors, valid))
        js = js.to(dev)
        layers, final = _main_pass(t.main_model or t.model, ids, mask, list(t.params.layer_ids),
                                   t.model.dtype)
        T = ids.shape[1]
        main = MainPass(None, layers, torch.arange(T, device=dev).unsqueeze(0).expand(B, T))
        hidden = t.forward(main, anchors, g, teacher_tokens(t.params, ids, anchors, g))  # [B, A, g, d]
        if r.chain_targets:
            valid = chain_consistent(valid, anchors, ids, final, unwrap_causal_lm(t.model).lm_head,
                                     r.lm_head_chunk)
        tpos = torch.minimum(anchors[:, :, None] + js, (lens - 1)[:, None, None])
        target_h = final[torch.arange(B, device=dev)[:, None, None], tpos].reshape(-1, final.shape[-1])
        counts = valid.sum(dim=(0, 1)).clamp(min=1).float()
        wts = valid.float() * (t.stream_weights() / counts)[None, None, :]
        d = hidden.shape[-1]
        loss, correct = chunked_lm_loss(hidden.reshape(-1, d), self.lm_weight, None, wts.reshape(-1),
                                        r.lm_head_chunk, target_h.float(), bias=self.lm_bias)
        data.tokens_seen += tokens_all
        data.anchors_seen += int(avalid.sum()) * world
        return StepOutput(loss, correct.reshape(B, A, g), valid, tokens)
