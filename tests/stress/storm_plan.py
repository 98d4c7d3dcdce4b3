"""What the load-and-fault storm sends, and how each answer is judged.

A plan is a deterministic list of requests (seeded): greedy chat (plain, streamed, with stop
strings, with logprobs), seeded sampling, n=2, client aborts, and max_model_len edges as
token-id completions. The same plan goes to a server without speculation and to one with it;
greedy answers must be identical (float32), everything else must be well-formed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Optional

SERVED_NAME = "storm"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
#: kinds whose answers must equal the no-speculation server's
GREEDY_KINDS = ("greedy", "greedy_stream", "stop", "logprobs", "edge")
STOPS = [".", "\n\n"]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does, briefly.",
    "List three uses of a paperclip.",
    "Why is the sky blue? Answer in two sentences.",
    "Translate 'good morning' into Spanish and French.",
    "Give me a short tip for learning to cook.",
    "What does HTTP stand for?",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "What are the main differences between a list and a tuple in Python?",
    "Describe the water cycle in a few sentences.",
    "Write a polite email asking a colleague to review my report.",
    "How many legs does a spider have, and why?",
    "Give me five ideas for a rainy weekend.",
    "Explain photosynthesis to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Write a limerick about a cat who loves coffee.",
    "Name three famous painters and one work by each.",
    "How do I make a cup of green tea?",
]
SYSTEM = {"role": "system", "content": "You are a concise, friendly assistant."}
#: natural text whose tokens make the fixed-length prompts of the max_model_len edges
EDGE_TEXT = ("The history of the printing press begins long before Gutenberg. Carved wooden blocks "
             "were used to print patterns on cloth and later whole pages of text. Movable type made "
             "of clay, then of metal, allowed printers to reuse letters, and the cost of books fell. ")


@dataclass
class Req:
    id: str
    kind: str
    path: str
    body: dict[str, Any]
    abort_after_chunks: int = 0          # > 0: stream, read that many chunks, hang up


@dataclass
class Outcome:
    id: str
    kind: str
    status: Optional[int] = None
    texts: list[str] = field(default_factory=list)
    finish: list[Optional[str]] = field(default_factory=list)
    completion_tokens: int = 0
    logprobs: Any = None
    error: Optional[str] = None          # transport error or unexpected status
    aborted: bool = False

    def key(self) -> tuple:
        """What must match the no-speculation server for greedy kinds."""
        return (self.status, self.texts, self.finish)


def _messages(rng: random.Random) -> list[dict[str, str]]:
    msgs = [{"role": "user", "content": rng.choice(PROMPTS)}]
    return [SYSTEM, *msgs] if rng.random() < 0.3 else msgs


def storm_plan(n: int, seed: int = 0, max_tokens: tuple[int, int] = (16, 96),
               ignore_eos: bool = False, kinds: Optional[list[str]] = None,
               tag: str = "") -> list[Req]:
    """``n`` mixed requests; the mix cycles through ``kinds`` so every kind is present.
    ``tag`` prefixes the ids (plans that are sent together)."""
    kinds = kinds or ["greedy", "seeded", "greedy_stream", "n2", "stop", "abort", "logprobs",
                      "greedy", "seeded"]
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        body: dict[str, Any] = {"model": SERVED_NAME, "messages": _messages(rng),
                                "max_tokens": rng.randint(*max_tokens), "temperature": 0.0}
        if ignore_eos:
            body["ignore_eos"] = True
        abort = 0
        if kind in ("seeded", "n2"):
            body.update(temperature=0.8, top_p=0.95, seed=1000 + i)
            if kind == "n2":
                body["n"] = 2
        elif kind == "stop":
            body["stop"] = STOPS
        elif kind == "logprobs":
            body.update(logprobs=True, top_logprobs=3)
        elif kind in ("greedy_stream", "abort"):
            body.update(stream=True, stream_options={"include_usage": True})
            if kind == "abort":
                body["max_tokens"] = max(body["max_tokens"], 64)
                abort = rng.randint(1, 4)
        plan.append(Req(f"{tag}{kind}-{i}", kind, CHAT, body, abort))
    return plan


def edge_plan(token_ids: list[int], max_model_len: int, gamma: int) -> list[Req]:
    """Token-id completions whose prompt + output reach ``max_model_len`` exactly, cross it by
    one, or start at/over it; speculation must neither write past the end nor change text."""
    plan = []

    def add(tag: str, prompt_len: int, max_tokens: Optional[int]) -> None:
        reps = prompt_len // max(1, len(token_ids)) + 1
        body: dict[str, Any] = {"model": SERVED_NAME, "prompt": (token_ids * reps)[:prompt_len],
                                "temperature": 0.0, "ignore_eos": True}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        plan.append(Req(f"edge-{tag}", "edge", COMPLETIONS, body))

    for room in sorted({1, 2, 3, gamma - 1, gamma, gamma + 1, 2 * gamma + 1, 16} - {0}):
        add(f"fill-{room}", max_model_len - room, room)       # ends exactly at max_model_len
        add(f"open-{room}", max_model_len - room, None)       # max_tokens left to the server
    add("over-by-1", max_model_len - 4, 5)                    # prompt + max_tokens = len + 1
    add("prompt-at-len", max_model_len, 1)
    add("prompt-over-len", max_model_len + 3, 1)
    return plan


def limits_plan() -> list[Req]:
    """min_p and logit_bias, which vLLM refuses (400) with any speculative method (README)."""
    chat = {"model": SERVED_NAME, "messages": [{"role": "user", "content": PROMPTS[0]}],
            "max_tokens": 8, "temperature": 0.0}
    return [Req("refused-min_p", "refused", CHAT, dict(chat, temperature=0.8, seed=1, min_p=0.05)),
            Req("refused-logit_bias", "refused", CHAT, dict(chat, logit_bias={"42": 5}))]


def check(req: Req, out: Outcome) -> list[str]:
    """Problems of one answer on its own (well-formedness, not equality)."""
    if out.error:
        return [f"{req.id}: {out.error}"]
    if req.kind == "abort":
        return []
    if req.kind in ("edge", "refused"):  # the status is compared across servers
        return [] if out.status in (200, 400) else [f"{req.id}: HTTP {out.status}"]
    problems = []
    n = req.body.get("n", 1)
    if len(out.texts) != n:
        problems.append(f"{req.id}: {len(out.texts)} choices, asked for {n}")
    if any(f not in ("stop", "length") for f in out.finish):
        problems.append(f"{req.id}: finish reasons {out.finish}")
    if out.completion_tokens > n * req.body["max_tokens"]:
        problems.append(f"{req.id}: {out.completion_tokens} tokens > max_tokens")
    if req.kind == "stop" and any(s in t for t in out.texts for s in STOPS):
        problems.append(f"{req.id}: a stop string is in the output")
    if req.kind == "logprobs":
        problems += _check_logprobs(req, out)
    return problems


def _check_logprobs(req: Req, out: Outcome) -> list[str]:
    content = (out.logprobs or {}).get("content") or []
    if len(content) != out.completion_tokens:
        return [f"{req.id}: {len(content)} logprob entries for {out.completion_tokens} tokens"]
    for pos, entry in enumerate(content):
        tops = entry.get("top_logprobs") or []
        if len(tops) != 3:
            return [f"{req.id}: {len(tops)} top_logprobs at position {pos}, asked for 3"]
        if entry["logprob"] < max(t["logprob"] for t in tops) - 1e-3:  # greedy takes the top-1
            return [f"{req.id}: token {entry['token']!r} at {pos} is not the most likely"]
    return []
