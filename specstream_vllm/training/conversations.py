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
* Two passes (:func:`training_units`): the first takes each conversation's first
  ``seq_len`` tokens; the second everything the first left: the later windows of those
  conversations (ShareGPT conversations average ~1,500 tokens, the first window holds
  ~460) and the conversations that open with an assistant turn (continuations in
  ShareGPT; their leading assistant turns are dropped). Old cursors stay valid: the
  second pass only appends to the first.
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


@dataclass(frozen=True)
class Unit:
    """What the stream takes from one conversation: windows ``first_window`` onwards
    (each ``max_len`` tokens), at most ``max_windows`` of them (None: all)."""
    conv: Conversation
    first_window: int = 0
    max_windows: int | None = 1


@dataclass
class EncodedConversation:
    id: str
    ids: torch.Tensor  # [T] int64
    assistant: torch.Tensor  # [T] bool: token is part of an assistant turn (what the model generates)

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def load_conversations(path=None, split: str = "train", heldout_fraction: float = 0.05,
                       exclude_first_turns: set[str] | None = None, seed: int = 0,
                       leading_assistant: bool = False) -> list[Conversation]:
    """Alternating user/assistant conversations of one split, in a fixed hash order.

    A conversation is cut at its first irregular turn (unknown role, two turns of one role
    in a row, empty text); ones without a complete user -> assistant exchange are dropped.
    ``leading_assistant=True`` instead returns only the conversations that open with
    assistant turns, with those turns dropped (the default drops these conversations).
    """
    out, seen = [], set()
    exclude = exclude_first_turns or set()
    for item in _json_array_items(path or sharegpt_path()):
        cid = str(item.get("id"))
        if conversation_split(cid, heldout_fraction) != split:
            continue
        turns = list(item.get("conversations") or [])
        lead = 0
        while lead < len(turns) and _ROLES.get(str(turns[lead].get("from", "")).lower()) == "assistant":
            lead += 1
        if leading_assistant != (lead > 0):
            continue
        msgs: list[dict] = []
        for turn in turns[lead:]:
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


def training_units(first_pass: list[Conversation], continuations: list[Conversation],
                   seed: int = 0) -> list[Unit]:
    """The whole order a teacher-forced run walks: the first pass (each conversation's
    first window, in ``first_pass`` order), then, in their own hash order, the rest of
    those conversations and every window of ``continuations``."""
    units = [Unit(c, 0, 1) for c in first_pass]
    rest = [Unit(c, 1, None) for c in first_pass] + [Unit(c, 0, None) for c in continuations]
    rest.sort(key=lambda u: _unit_hash(u.conv.id, f"tf-second-pass:{seed}:"))
    return units + rest


def window(enc: EncodedConversation, index: int, max_len: int) -> EncodedConversation | None:
    """Tokens ``[index * max_len, (index + 1) * max_len)`` of a whole encoded conversation
    (None past its end)."""
    ids = enc.ids[index * max_len:(index + 1) * max_len]
    asst = enc.assistant[index * max_len:(index + 1) * max_len]
    if ids.numel() == 0:
        return None
    return EncodedConversation(enc.id if index == 0 else f"{enc.id}#w{index}", ids, asst)


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
    """Encoded training windows from a cursor on; each is used once (no epochs).

    Walks a list of :class:`Unit` (plain conversations mean their first window only).
    ``cursor`` counts units finished (encoded or skipped) and ``window`` the windows
    already taken from the current one, so saving both and resuming from them continues
    exactly where a run stopped.
    """

    #: windows a second-pass unit yields on average (ShareGPT: ~1,500 tokens per
    #: conversation at 512 per window); only sizes the learning-rate schedule
    SECOND_PASS_WINDOWS = 2.5

    def __init__(self, tokenizer, units: list, max_len: int, cursor: int = 0, window: int = 0):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.units = [u if isinstance(u, Unit) else Unit(u) for u in units]
        self.cursor, self.window = cursor, window
        self._encoded: tuple[int, EncodedConversation | None] | None = None

    @property
    def remaining(self) -> int:
        """Units not finished yet."""
        return max(0, len(self.units) - self.cursor)

    def windows_remaining(self) -> int:
        """Windows left: exact for first-pass units, an estimate for the others."""
        left = self.units[self.cursor:]
        est = sum(1 if u.max_windows == 1 else self.SECOND_PASS_WINDOWS for u in left)
        return int(est)

    def _encode(self, unit: Unit) -> EncodedConversation | None:
        if self._encoded is None or self._encoded[0] != self.cursor:
            cap = self.max_len if unit.max_windows == 1 and unit.first_window == 0 else 1 << 30
            self._encoded = (self.cursor, encode_conversation(self.tokenizer, unit.conv, cap))
        return self._encoded[1]

    def take(self, n: int) -> list[EncodedConversation]:
        """The next ``n`` usable windows (fewer only when the data set runs out)."""
        out = []
        while len(out) < n and self.cursor < len(self.units):
            unit = self.units[self.cursor]
            enc = self._encode(unit)
            w = None
            if enc is not None and (unit.max_windows is None or self.window < unit.max_windows):
                w = window(enc, unit.first_window + self.window, self.max_len)
            if w is None:
                self.cursor, self.window, self._encoded = self.cursor + 1, 0, None
                continue
            self.window += 1
            if int(w.assistant.sum()) >= 3:  # a window of user text only teaches nothing
                out.append(w)
            if unit.max_windows is not None and self.window >= unit.max_windows:
                self.cursor, self.window, self._encoded = self.cursor + 1, 0, None
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
