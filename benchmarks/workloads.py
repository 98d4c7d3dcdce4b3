"""Benchmark prompt sets: MT-Bench first turns, held-out ShareGPT, its code prompts, or a JSONL file.

Every workload is a list of :class:`Prompt`, each a chat conversation (``messages``) that the
engines render with the model's chat template; the same list goes to every method of a run.
The data (MT-Bench questions, ShareGPT first turns, the train/held-out split) is the trainer's
(``specstream_vllm.training.data``), so benchmark prompts never come from its training side.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from specstream_vllm.training import data

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """One benchmark request: an id and a chat conversation ending with a user turn."""

    id: str
    messages: tuple[Message, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": [dict(m) for m in self.messages]}


def load_mtbench() -> list[Prompt]:
    """The 80 MT-Bench first turns, in question order."""
    return [Prompt(f"mtbench-{r['question_id']}", ({"role": "user", "content": r["turns"][0]},))
            for r in data.mtbench_questions()]


def is_heldout(conversation_id: str) -> bool:
    """True when a ShareGPT conversation is on the held-out side of the trainer's split."""
    from specstream_vllm.training.recipe import DataSpec

    return data.conversation_split(conversation_id, DataSpec().heldout_fraction) == "heldout"


def sharegpt_prompts(first_turns: Iterable[tuple[str, str]], exclude: set[str] = frozenset(),
                     max_chars: int = 4000) -> list[Prompt]:
    """Held-out (id, first human turn) pairs as prompts, minus ``exclude``d (normalized) texts,
    in a fixed hash order."""
    out: list[tuple[str, Prompt]] = []
    for cid, text in first_turns:
        text = text.strip()
        if not text or len(text) > max_chars or data._norm(text) in exclude or not is_heldout(cid):
            continue
        key = hashlib.sha256(("order:" + cid).encode()).hexdigest()
        out.append((key, Prompt(f"sharegpt-{cid}", ({"role": "user", "content": text},))))
    out.sort(key=lambda kv: kv[0])
    return [p for _, p in out]


def load_sharegpt() -> list[Prompt]:
    """Held-out ShareGPT first turns, without MT-Bench questions (deterministic order)."""
    return sharegpt_prompts(data.sharegpt_first_turns(), exclude=data.mtbench_texts_normalized())


_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |#include|function |const |let |var |"
                        r"public |private |return\b|if \(|for \(|while \(|SELECT |<\w+[ >])|"
                        r"[;{}]\s*$")


def looks_like_code(text: str) -> bool:
    """A fenced code block, or at least 4 lines that look like code."""
    if "```" in text:
        return True
    return sum(1 for line in text.splitlines() if _CODE_LINE.search(line)) >= 4


def load_code() -> list[Prompt]:
    """Code-heavy prompts: the held-out ShareGPT first turns that contain code (to fix,
    explain, convert or extend: answers that copy much of the prompt)."""
    return [Prompt(p.id.replace("sharegpt-", "code-", 1), p.messages) for p in load_sharegpt()
            if looks_like_code(p.messages[-1]["content"])]


def parse_prompts_jsonl(text: str, source: str = "<prompts>") -> list[Prompt]:
    """Parse JSONL rows with ``prompt`` (a string) or ``messages`` (chat list); ``id`` optional."""
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{lineno}: not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{source}:{lineno}: expected an object")
        pid = str(row.get("id", f"line-{lineno}"))
        if isinstance(row.get("messages"), list) and row["messages"]:
            msgs = tuple({"role": str(m["role"]), "content": str(m["content"])}
                         for m in row["messages"])
        elif isinstance(row.get("prompt"), str):
            msgs = ({"role": "user", "content": row["prompt"]},)
        else:
            raise ValueError(f"{source}:{lineno}: needs `prompt` (string) or `messages` (list)")
        prompts.append(Prompt(pid, msgs))
    if not prompts:
        raise ValueError(f"{source}: no prompts")
    return prompts


WORKLOADS = ("mtbench", "sharegpt", "code", "mixed")


def load_workload(name: str, prompts_file: str | None = None) -> list[Prompt]:
    """``mtbench``, ``sharegpt``, ``code``, ``mixed`` (MT-Bench and ShareGPT alternating, so any
    first N holds both) or, with ``prompts_file``, a JSONL file."""
    if prompts_file:
        path = Path(prompts_file)
        return parse_prompts_jsonl(path.read_text(encoding="utf-8"), str(path))
    if name == "mtbench":
        return load_mtbench()
    if name == "sharegpt":
        return load_sharegpt()
    if name == "code":
        return load_code()
    if name == "mixed":
        a, b = load_mtbench(), load_sharegpt()
        return [p for pair in zip(a, b) for p in pair] + a[len(b):] + b[len(a):]
    raise ValueError(f"unknown workload {name!r}: use {', '.join(WORKLOADS)} or --prompts FILE")


def fit_prompts(prompts: list[Prompt], model: str, budget: int) -> tuple[list[Prompt], int]:
    """Drop prompts whose chat-templated length exceeds ``budget`` tokens; return kept, dropped."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)

    def length(p: Prompt) -> int:
        # tokenize=True returns a BatchEncoding (a 2-key dict) in transformers 5: count the text
        text = tok.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False).input_ids)
    kept = [p for p in prompts if length(p) <= budget]
    return kept, len(prompts) - len(kept)


def prompts_digest(prompts: list[Prompt]) -> str:
    """Short hash of the prompt set, recorded with the results."""
    blob = json.dumps([asdict(p) for p in prompts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
