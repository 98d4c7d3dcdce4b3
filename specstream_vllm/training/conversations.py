"""Teacher-forced ShareGPT conversations: training signal that does not wait for generation.

Every turn of a conversation is rendered with the base model's chat template and run
through the model once; the streams learn the base model's *own* next-token
distribution at every assistant position (it falls out of that main pass), so no answer
has to be generated first. Self-distillation at ~100 tok/s on a 2-core CPU is two orders
of magnitude slower than this one forward.

* Split: train / held-out by a hash of the conversation id (as :mod:`.data`), and any
  conversation whose first human turn is an MT-Bench question is dropped.
* Order: a fixed hash order per ``seed``; the trainer keeps a cursor into it, so a
  resumed run continues on conversations it has not seen (:class:`ConversationStream`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .data import _json_array_items, _norm, _unit_hash, conversation_split, sharegpt_path

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
          "bard": "assistant", "assistant": "assistant"}


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role": "user"|"assistant", "content": str}], alternating


@dataclass
class EncodedConversation:
    id: str
    ids: torch.Tensor  # [T] int64
    assistant: torch.Tensor  # [T] bool: token is part of an assistant turn (what the model generates)

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def load_conversations(path=None, split: str = "train", heldout_fraction: float = 0.05,
                       exclude_first_turns: set[str] | None = None, seed: int = 0
                       ) -> list[Conversation]:
    """Alternating user/assistant conversations of one split, in a fixed hash order.

    A conversation is cut at its first irregular turn (unknown role, two turns of one role
    in a row, empty text); ones without a complete user -> assistant exchange are dropped.
    """
    out, seen = [], set()
    exclude = exclude_first_turns or set()
    for item in _json_array_items(path or sharegpt_path()):
        cid = str(item.get("id"))
        if conversation_split(cid, heldout_fraction) != split:
            continue
        msgs: list[dict] = []
        for turn in item.get("conversations") or []:
            role = _ROLES.get(str(turn.get("from", "")).lower())
            text = turn.get("value") or ""
            want = "user" if len(msgs) % 2 == 0 else "assistant"
            if role != want or not text.strip():
                break
            msgs.append({"role": role, "content": text})
        if len(msgs) % 2:
            msgs = msgs[:-1]
        if not msgs:
            continue
        key = _norm(msgs[0]["content"])
        if key in exclude or (cid, key) in seen:
            continue
        seen.add((cid, key))
        out.append(Conversation(cid, msgs))
    out.sort(key=lambda c: _unit_hash(c.id, f"tf-order:{seed}:"))
    return out


def encode_conversation(tokenizer, conv: Conversation, max_len: int) -> EncodedConversation | None:
    """Chat-template tokens (cut to ``max_len``) with the assistant turns marked.

    An assistant turn's tokens are those between the prompt rendered with the generation
    prompt and the conversation rendered through that turn, up to and including its
    end-of-turn (EOS) token, which the model generates. None if rendering is not
    prefix-consistent.
    """
    def render(msgs, gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    mask: list[bool] = []
    eos = tokenizer.eos_token_id
    for i in range(1, len(conv.messages), 2):
        prefix = render(conv.messages[:i], True)
        full = render(conv.messages[:i + 1], False)
        if full[:len(ids)] != ids or prefix[:len(ids)] != ids or full[:len(prefix)] != prefix:
            return None
        turn = full[len(prefix):]
        n_gen = len(turn)  # the model stops at its end-of-turn token: what follows is template
        if eos is not None and eos in turn:
            n_gen = len(turn) - turn[::-1].index(eos)
        mask += [False] * (len(prefix) - len(ids)) + [True] * n_gen + [False] * (len(turn) - n_gen)
        ids = full
        if len(ids) >= max_len:
            break
    ids, mask = ids[:max_len], mask[:max_len]
    if sum(mask) < 3:
        return None
    return EncodedConversation(conv.id, torch.tensor(ids, dtype=torch.long),
                               torch.tensor(mask, dtype=torch.bool))


class ConversationStream:
    """Encoded conversations from a cursor on; each is used once (no epochs).

    ``cursor`` counts conversations consumed (encoded or skipped), so saving it and
    resuming from it continues exactly where a run stopped.
    """

    def __init__(self, tokenizer, conversations: list[Conversation], max_len: int, cursor: int = 0):
        self.tokenizer, self.convs, self.max_len = tokenizer, conversations, max_len
        self.cursor = cursor

    @property
    def remaining(self) -> int:
        return max(0, len(self.convs) - self.cursor)

    def take(self, n: int) -> list[EncodedConversation]:
        """The next ``n`` usable conversations (fewer only when the data set runs out)."""
        out = []
        while len(out) < n and self.cursor < len(self.convs):
            enc = encode_conversation(self.tokenizer, self.convs[self.cursor], self.max_len)
            self.cursor += 1
            if enc is not None:
                out.append(enc)
        return out

    def __iter__(self) -> Iterator[EncodedConversation]:
        while True:
            got = self.take(1)
            if not got:
                return
            yield got[0]


def frequent_tokens(encoded: list[EncodedConversation], k: int, always: list[int] = ()) -> torch.Tensor:
    """Sorted ids of the ``k`` most frequent assistant tokens (plus ``always``, e.g. EOS):
    the draft vocabulary of a teacher-forced run."""
    toks = torch.cat([e.ids[e.assistant] for e in encoded])
    counts = torch.bincount(toks)
    top = torch.argsort(counts, descending=True)[:k]
    top = top[counts[top] > 0]
    extra = torch.tensor(list(always), dtype=torch.long)
    return torch.unique(torch.cat([top, extra]))
