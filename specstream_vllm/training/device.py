"""Where training runs: the device, the base model's dtype there, autocast and memory.

The trainer is device-agnostic: the same code runs on the CPU (float32, no autocast:
the numbers of a CPU run do not depend on this module) and on CUDA (the frozen base
model in bfloat16, the stream parameters and optimizer state in float32, autocast to
bfloat16 around the stream pass and its loss).
"""
from __future__ import annotations

import re
import resource
from contextlib import nullcontext
from pathlib import Path

import torch

from ..errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the recipe's ``dtype`` names off CUDA, where ``auto`` means float32
CPU_DTYPES = {**DTYPES, "auto": torch.float32}
#: share of a GPU's memory the frozen base model's bf16 weights may take
FIT_FRACTION = 0.9
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    if not _DEVICE_RE.match(name):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``auto`` = CUDA when ``torch.cuda.is_available()``, else the CPU. Under torchrun
    (``local_rank`` set) a bare ``cuda`` means this process's own GPU."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available here "
                          f"(torch {torch.__version__}, built for CUDA "
                          f"{torch.version.cuda or 'none'}); train with --device cpu, or install "
                          "a CUDA build of torch on a machine with an NVIDIA GPU")
    index = int(name.split(":")[1]) if ":" in name else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def base_dtype(name: str, device: torch.device) -> torch.dtype:
    """The frozen base model's dtype: ``auto`` = bfloat16 on CUDA, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """bfloat16 autocast for the stream pass on CUDA with a bfloat16 base (matmuls in
    bf16; softmax, log-softmax and the loss stay in float32); nothing elsewhere."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kB


def count_weights(model_dir: Path) -> int:
    """Parameters stored in a model directory's safetensors files, from their headers
    (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for s in st.get_slice(key).get_shape():
                    n *= s
                total += n
    return total


def check_fits(model_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a base model whose weights alone exceed ``FIT_FRACTION`` of the GPU."""
    if device.type != "cuda":
        return
    need = count_weights(model_dir) * torch.finfo(dtype).bits // 8
    have = torch.cuda.get_device_properties(device).total_memory
    if need > FIT_FRACTION * have:
        raise ConfigError(
            f"the base model's weights need {need / 2**30:.1f} GiB in {dtype}, more than "
            f"{FIT_FRACTION:.0%} of {device}'s {have / 2**30:.1f} GiB: it does not fit on one GPU. "
            "Sharding the model (FSDP) is not supported by the stream trainer; use a GPU with "
            "more memory (data parallel with torchrun keeps a whole copy per GPU)")


def load_base_model(base_dir: Path, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """The frozen base model, in eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    from ..reference.streams import check_architecture

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    check_architecture(model.config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)
