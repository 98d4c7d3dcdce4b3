"""The compared methods: each is a name and a vLLM ``speculative_config`` (None = no speculation).

Adding a method means adding one branch to :func:`build_methods`; nothing else in the harness
knows about particular methods.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ALL_METHODS = ("baseline", "baseline-sync", "ngram", "suffix", "medusa", "specstream",
               "specstream-streams", "specstream-suffix", "specstream-ngram")
#: specstream with a fixed match source (vllm_integration/match_source.py); plain
#: ``specstream`` uses the plugin's default
SPECSTREAM_MATCH = {"specstream-streams": "none", "specstream-suffix": "suffix",
                    "specstream-ngram": "ngram"}
#: ablations: "<specstream method>+<name>" runs that method with these engine environment
#: variables, e.g. "specstream+noguard"
ABLATIONS = {"noguard": {"SPECSTREAM_POLICY_REALIZED_GUARD": "0"},
             "nobudget": {"SPECSTREAM_POLICY_MATCH_BUDGET": "0"},
             # the match source alone, through the policy: what the streams add
             "nostreams": {"SPECSTREAM_POLICY_STREAMS": "0"},
             "fixed": {"SPECSTREAM_DRAFT_POLICY": "fixed"},    # every stream, every step
             # the stream pass's own weights (draft_precision)
             "bf16": {"SPECSTREAM_DRAFT_PRECISION": "bfloat16"},
             "int8": {"SPECSTREAM_DRAFT_PRECISION": "int8"},
             "exact": {"SPECSTREAM_DRAFT_PRECISION": "exact"},
             # never drafts, never probes: what a speculative engine costs with nothing drafted
             "off": {"SPECSTREAM_POLICY_FORCE_OFF_STEPS": str(10**9)}}

#: "<specstream method>@<draft pass>" sets the speculative config's ``draft_pass``
DRAFT_PASSES = ("separate", "fused", "auto")
#: "<method>%<dtype>" runs that method in this dtype instead of the run's ``--dtype``, so one
#: run can hold the automatic dtype's default beside every method in bfloat16
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Method:
    """A method to benchmark; ``skip_reason`` set means it cannot run in this configuration."""

    name: str
    speculative_config: dict[str, Any] | None
    weights_dir: str | None = None  # where its extra parameters live (for counting)
    skip_reason: str | None = None
    extra_params: int | None = None
    #: extra engine arguments (``vllm.LLM`` keywords; online, ``vllm serve`` flags):
    #: "baseline-sync" is the baseline with async scheduling off, as vLLM 0.32 runs specstream
    engine_args: dict[str, Any] = field(default_factory=dict)
    #: extra environment of the engine process: see ABLATIONS
    env: dict[str, str] = field(default_factory=dict)

    @property
    def keeps_request_state(self) -> bool:
        """suffix caches earlier responses (so does specstream with the suffix match source):
        an engine that already answered a prompt would look better on it, so it gets a fresh
        engine per batch size / concurrency level."""
        spec = self.speculative_config or {}
        if spec.get("method") == "specstream":
            from specstream_vllm.vllm_integration.config import DEFAULT_MATCH
            return spec.get("match", DEFAULT_MATCH) == "suffix"
        return spec.get("method") == "suffix"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "speculative_config": self.speculative_config,
                "weights_dir": self.weights_dir, "skip_reason": self.skip_reason,
                "extra_params": self.extra_params, "engine_args": self.engine_args,
                "env": self.env,
                "fresh_engine_per_level": self.keeps_request_state}


def count_safetensors_params(path: str | Path) -> int:
    """Number of parameters in a safetensors file or in every ``*.safetensors`` of a folder."""
    from safetensors import safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no .safetensors under {p}")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


def _medusa_heads(path: Path, default: int) -> int:
    cfg = path / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        for key in ("medusa_num_heads", "num_heads", "num_speculative_tokens"):
            if isinstance(data.get(key), int):
                return int(data[key])
    return default


def default_streams(model: str | None, streams: str | None) -> str | None:
    """``--streams``, else the shipped streams when the model is the default one (a run
    without them would time "specstream" with no speculative config)."""
    if streams is not None or model is not None:
        return streams
    from specstream_vllm.assets import shipped_streams_dir
    shipped = shipped_streams_dir()
    return str(shipped) if shipped is not None else None


def build_methods(names: list[str], medusa: str | None = None, streams: str | None = None,
                  specstream_k: int = 4, medusa_k: int | None = None,
                  suffix_k: int = 8, alt_streams: str | None = None) -> list[Method]:
    """Build the requested methods; a method whose weights are missing gets ``skip_reason``.
    A specstream name ending in ``-alt`` (``specstream-alt``, ``specstream-streams-alt``) is
    the same method on the ``alt_streams`` checkpoint: two checkpoints in one run."""
    out: list[Method] = []
    for name in names:
        base, pct, dtype = name.partition("%")
        if pct:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype in {name!r}: use <method>%{{{','.join(DTYPES)}}}")
            m = build_methods([base], medusa, streams, specstream_k, medusa_k, suffix_k,
                              alt_streams)[0]
            m.name, m.engine_args = name, {**m.engine_args, "dtype": dtype}
            out.append(m)
            continue
        base, plus, ablation = name.partition("+")
        if plus:
            if ablation not in ABLATIONS or not base.startswith("specstream"):
                raise ValueError(f"unknown ablation {name!r}: use <specstream method>+"
                                 f"{{{','.join(ABLATIONS)}}}")
            m = build_methods([base], medusa, streams, specstream_k, medusa_k, suffix_k,
                              alt_streams)[0]
            m.name, m.env = name, dict(ABLATIONS[ablation])
            out.append(m)
            continue
        base, at, draft_pass = name.partition("@")
        if at:      # "specstream-streams@fused": the same method with that draft pass
            if draft_pass not in DRAFT_PASSES or not base.startswith("specstream"):
                raise ValueError(f"unknown draft pass {name!r}: use <specstream method>@"
                                 f"{{{','.join(DRAFT_PASSES)}}}")
            m = build_methods([base], medusa, streams, specstream_k, medusa_k, suffix_k,
                              alt_streams)[0]
            m.name = name
            if m.speculative_config is not None:
                m.speculative_config["draft_pass"] = draft_pass
            out.append(m)
            continue
        if name.startswith("specstream") and name.endswith("-alt"):
            m = build_methods([name[:-len("-alt")]], streams=alt_streams,
                              specstream_k=specstream_k)[0]
            m.name = name
            if m.skip_reason and not alt_streams:
                m.skip_reason = "not given: pass --alt-streams STREAMS_DIR"
            out.append(m)
            continue
        if name == "baseline":
            m = Method(name, None)
        elif name == "baseline-sync":
            m = Method(name, None, engine_args={"async_scheduling": False})
        elif name == "ngram":
            m = Method(name, {"method": "ngram", "num_speculative_tokens": 4,
                              "prompt_lookup_min": 2, "prompt_lookup_max": 4})
        elif name == "suffix":
            m = Method(name, {"method": "suffix", "num_speculative_tokens": suffix_k})
        elif name == "medusa":
            m = _weights_method(name, "medusa", medusa, "--medusa HEADS_DIR", medusa_k, 4)
        elif name == "specstream" or name.split(":")[0] in SPECSTREAM_MATCH:
            # "specstream-suffix:8": the suffix match source drafting up to 8 tokens
            kind, _, tokens = name.partition(":")
            m = _weights_method(name, "specstream", streams, "--streams STREAMS_DIR",
                                specstream_k, specstream_k)
            if kind in SPECSTREAM_MATCH and m.speculative_config is not None:
                m.speculative_config["match"] = SPECSTREAM_MATCH[kind]
                if tokens:
                    m.speculative_config["match_tokens"] = int(tokens)
        else:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(ALL_METHODS)}")
        out.append(m)
    return out


def _weights_method(name: str, method: str, path: str | None, flag: str,
                    k: int | None, default_k: int) -> Method:
    if not path:
        return Method(name, None, skip_reason=f"not given: pass {flag}")
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        return Method(name, None, skip_reason=f"{p} is not a directory")
    if k is None:
        k = _medusa_heads(p, default_k) if method == "medusa" else default_k
    m = Method(name, {"method": method, "model": str(p), "num_speculative_tokens": k},
               weights_dir=str(p))
    try:
        m.extra_params = count_safetensors_params(p)
    except (FileNotFoundError, OSError, ValueError) as exc:
        m.skip_reason = f"cannot read weights in {p}: {exc}"
    return m
