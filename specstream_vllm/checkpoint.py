"""The stream checkpoint: the contract between the trainer and the vLLM proposer.

A checkpoint is a directory with ``config.json`` (a :class:`StreamCheckpointConfig`)
and ``model.safetensors`` holding

* ``stream_embeddings``: ``[num_streams, hidden_size]`` -- the e_j of DESIGN.md;
* optionally ``layers.{i}.{module}.lora_A`` ``[rank, in]`` and ``.lora_B``
  ``[out, rank]`` for absolute layer index ``i`` in the top ``num_stream_layers``
  layers: the stream-only LoRA delta (lossless mode);
* optionally ``draft_vocab``: sorted int64 token ids the streams may draft (the
  tokens they were trained to predict). Drafting only over these rows of the LM
  head makes the draft pass's LM head several times cheaper; verification still
  uses the full vocabulary, so outputs do not change;
* with ``stream_input: "next_token"`` or ``"chain"`` also ``token_map.A`` ``[r, d]`` and
  ``token_map.B`` ``[d, r]``: the map g of DESIGN.md's next-token-aware form,
  ``g(x) = B A n(E[x])`` with E the base model's frozen input embedding and n an
  RMS normalisation (see :func:`next_token_features`). ``next_token``: every stream
  reads g(x_{t+1}); ``chain``: stream j reads g(x_{t+j}), the token at its own position
  (for j >= 2 the previous stream's draft, so the streams are drafted one at a time).
* ``stream_input: "anchor"`` carries the same tensors as ``"paper"`` (h_t + e_j, no token
  map) but its streams attend to the main keys/values at positions <= t only: not to
  each other, not to themselves. A stream row is then a query-only row that needs only
  keys the main rows of the same layer have written, so the draft can be computed inside
  the verification forward or in a separate pass after it, with the same result.

A fine-tuned model directory carries its streams in a ``specstream/`` subfolder.
The base model is identified by a fingerprint of its config and a few weight
rows, read straight from its safetensors files so the trainer (HF) and the
server (vLLM, possibly tensor-parallel) compute the same value.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import BaseModelMismatchError, CheckpointError
from .families import (FAMILIES, LLAMA, LORA_TARGETS, SUPPORTED_ARCHITECTURES,  # noqa: F401 - re-exported
                       dims_of, lora_module_shapes)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMBEDDINGS_KEY = "stream_embeddings"
DRAFT_VOCAB_KEY = "draft_vocab"
TOKEN_MAP_A_KEY = "token_map.A"
TOKEN_MAP_B_KEY = "token_map.B"
TOKEN_MAP_EPS = 1e-6
STREAMS_SUBDIR = "specstream"
MODEL_TYPE = "specstream"



class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])

    @model_validator(mode="after")
    def _known_targets(self) -> "LoraSpec":
        bad = [m for m in self.target_modules if m not in LORA_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA target modules {bad}; choose from {list(LORA_TARGETS)}")
        return self

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class BaseModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name_or_path: str
    architecture: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str


class GreedyProposal(BaseModel):
    """How the proposer turns stream outputs into a draft: the top-1 chain of the streams,
    cut at the first stream whose top-1 probability (softmax over the draft vocabulary)
    is below ``min_draft_prob`` -- a draft token that would likely be rejected costs
    verification compute for nothing, most of all at large batch sizes. ``match``: the
    checkpoint's default match source beside the streams (``suffix``, ``ngram`` or ``none``;
    the speculative config's ``"match"`` overrides it; unset: the plugin's default)."""

    model_config = ConfigDict(extra="forbid")
    proposal_type: Literal["greedy"] = "greedy"
    speculative_tokens: Optional[int] = Field(None, ge=1)
    min_draft_prob: float = Field(0.0, ge=0.0, lt=1.0)
    match: Optional[Literal["suffix", "ngram", "none"]] = None


class SpeculatorsInfo(BaseModel):
    """Mirrors vllm-project/speculators' ``speculators_config`` where it fits."""

    model_config = ConfigDict(extra="allow")
    algorithm: Literal["specstream"] = "specstream"
    proposal_methods: list[dict] = Field(default_factory=list)
    default_proposal_method: str = "greedy"
    verifier: dict = Field(default_factory=dict)

    def greedy_proposal(self) -> GreedyProposal:
        for m in self.proposal_methods:
            if m.get("proposal_type") == "greedy":
                return GreedyProposal.model_validate(m)
        return GreedyProposal()


class StreamCheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    architectures: list[str] = Field(default_factory=lambda: ["SpecStreamModel"])
    model_type: Literal["specstream"] = MODEL_TYPE
    format_version: int = FORMAT_VERSION
    mode: Literal["lossless", "finetuned"] = "lossless"
    num_streams: int = Field(..., ge=1, le=16)
    num_stream_layers: int = Field(..., ge=1)
    lora: Optional[LoraSpec] = None
    base_model: BaseModelRef
    torch_dtype: str = "float32"
    draft_vocab_size: Optional[int] = Field(None, ge=1)
    stream_input: Literal["paper", "next_token", "chain", "anchor"] = Field(
        "paper", description='"paper": stream j gets h_t + e_j (Bhendawade et al.); "next_token": '
                             "h_t + e_j + g(x_{t+1}), x_{t+1} the token sampled at the anchor; "
                             '"chain": h_t + e_j + g(x_{t+j}), x_{t+j} for j >= 2 the draft of '
                             'stream j-1 (drafted one stream at a time); "anchor": h_t + e_j, '
                             "attending to the main keys <= t only (no stream-stream attention)")
    token_map_rank: Optional[int] = Field(None, ge=1, description="rank r of g (next_token and "
                                                                  "chain forms)")
    speculators_config: SpeculatorsInfo = Field(default_factory=SpeculatorsInfo)
    training: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _layers_fit(self) -> "StreamCheckpointConfig":
        if self.num_stream_layers > self.base_model.num_hidden_layers:
            raise ValueError(
                f"num_stream_layers={self.num_stream_layers} exceeds the base model's "
                f"{self.base_model.num_hidden_layers} layers")
        if reads_tokens(self.stream_input) != (self.token_map_rank is not None):
            raise ValueError("token_map_rank must be set exactly when stream_input is "
                             f"'next_token' or 'chain' (stream_input={self.stream_input!r}, "
                             f"token_map_rank={self.token_map_rank})")
        return self

    @property
    def first_stream_layer(self) -> int:
        return self.base_model.num_hidden_layers - self.num_stream_layers


# --------------------------------------------------------------------------- fingerprint

def _read_base_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"base model directory {model_dir} has no config.json; "
                              "pass a local Hugging Face model directory")
    return json.loads(cfg_path.read_text())


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file (handles sharded checkpoints)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in wm.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"base model directory {model_dir} has no safetensors weights")


def base_fingerprint(model_dir: str | Path) -> str:
    """Hash of the architecture-defining config fields and a few weight rows.

    Rows are rounded through bf16 so a bf16 and a float32 save of the same model agree.
    """
    model_dir = Path(model_dir)
    cfg = _read_base_config(model_dir)
    h = hashlib.sha256()
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size")
    h.update(json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True).encode())
    files = _weight_files(model_dir)
    n = dims_of(cfg).num_hidden_layers or 1
    family = FAMILIES.get((cfg.get("architectures") or ["?"])[0], LLAMA)
    probes = [p.format(last=n - 1) for p in family.fingerprint_probes]
    for name in probes:
        if name not in files:
            continue
        with safe_open(str(files[name]), "pt") as f:
            rows = f.get_slice(name)[:4]
        h.update(name.encode())
        h.update(rows.to(torch.bfloat16).to(torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def base_model_ref(model_dir: str | Path) -> BaseModelRef:
    model_dir = Path(model_dir)
    cfg = _read_base_config(model_dir)
    dims = dims_of(cfg)
    return BaseModelRef(
        name_or_path=str(model_dir),
        architecture=(cfg.get("architectures") or ["?"])[0],
        num_hidden_layers=dims.num_hidden_layers,
        hidden_size=dims.hidden_size,
        vocab_size=dims.vocab_size,
        fingerprint=base_fingerprint(model_dir),
    )


# --------------------------------------------------------------------------- save / load

def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a stream checkpoint or a fine-tuned model directory that carries one."""
    p = Path(path)
    if (p / STREAMS_SUBDIR / CONFIG_NAME).is_file():
        return p / STREAMS_SUBDIR
    return p


def save_checkpoint(path: str | Path, config: StreamCheckpointConfig,
                    tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if EMBEDDINGS_KEY not in tensors:
        raise CheckpointError(f"refusing to save a checkpoint without '{EMBEDDINGS_KEY}'")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(config.model_dump_json(indent=2) + "\n")
    return path


def load_checkpoint_config(path: str | Path) -> StreamCheckpointConfig:
    path = resolve_checkpoint_dir(path)
    if not path.exists():
        raise CheckpointError(f"stream checkpoint {path} does not exist; train one with "
                              "`specstream train` or point to the shipped one")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"stream checkpoint {path} has no {CONFIG_NAME}; it must hold "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME} as written by `specstream train`")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None
    if raw.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"{cfg_path} is not a specstream checkpoint (model_type={raw.get('model_type')!r}); "
            "pass the directory written by `specstream train`, not a base model")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version={version!r}, this specstream-vllm reads version "
            f"{FORMAT_VERSION}; re-export it with a matching specstream-vllm release")
    try:
        cfg = StreamCheckpointConfig.model_validate(raw)
        cfg.speculators_config.greedy_proposal()
        return cfg
    except ValidationError as e:
        raise CheckpointError(f"{cfg_path} is malformed:\n{e}") from None


def load_checkpoint(path: str | Path, *, base_model_dir: str | Path | None = None,
                    num_speculative_tokens: int | None = None,
                    check_fingerprint: bool = True,
                    ) -> tuple[StreamCheckpointConfig, dict[str, torch.Tensor]]:
    """Load and validate a checkpoint against the base model it will run on."""
    path = resolve_checkpoint_dir(path)
    cfg = load_checkpoint_config(path)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise CheckpointError(f"stream checkpoint {path} has no {WEIGHTS_NAME}")
    validate_against_base(cfg, base_model_dir, num_speculative_tokens, check_fingerprint)
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{wpath} cannot be read as safetensors ({e})") from None
    base_cfg = None
    if base_model_dir is not None and (Path(base_model_dir) / "config.json").is_file():
        base_cfg = _read_base_config(Path(base_model_dir))
    check_tensor_shapes(cfg, tensors, wpath, base_cfg)
    _check_draft_vocab(cfg, tensors, wpath)
    return cfg, tensors


def expected_tensor_shapes(cfg: StreamCheckpointConfig,
                           base_config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies, with its shape. LoRA shapes need the base model's
    config (head counts, intermediate size); without it only hidden-size tensors are listed."""
    d = cfg.base_model.hidden_size
    out: dict[str, tuple[int, ...]] = {EMBEDDINGS_KEY: (cfg.num_streams, d)}
    if reads_tokens(cfg.stream_input):
        out[TOKEN_MAP_A_KEY] = (cfg.token_map_rank, d)
        out[TOKEN_MAP_B_KEY] = (d, cfg.token_map_rank)
    if cfg.lora is not None and base_config is not None:
        shapes = lora_module_shapes(base_config)
        for layer in range(cfg.first_stream_layer, cfg.base_model.num_hidden_layers):
            for name in cfg.lora.target_modules:
                if name not in shapes:
                    raise CheckpointError(
                        f"LoRA target {name} does not exist in a {cfg.base_model.architecture}; "
                        f"it has {list(shapes)}")
                fan_in, fan_out = shapes[name]
                out[f"layers.{layer}.{name}.lora_A"] = (cfg.lora.rank, fan_in)
                out[f"layers.{layer}.{name}.lora_B"] = (fan_out, cfg.lora.rank)
    return out


def check_tensor_shapes(cfg: StreamCheckpointConfig, tensors: dict[str, torch.Tensor], wpath,
                        base_config: dict | None = None) -> None:
    """One clear error if a tensor is missing, unexpected or of the wrong shape."""
    want = expected_tensor_shapes(cfg, base_config)
    problems = []
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            problems.append(f"'{name}' is missing (config implies shape {shape})")
        elif tuple(t.shape) != shape:
            problems.append(f"'{name}' has shape {tuple(t.shape)}, config says {shape}")
    known = set(want) | {DRAFT_VOCAB_KEY}
    extra = [k for k in tensors if k not in known
             and not (base_config is None and k.startswith("layers.") and cfg.lora is not None)]
    if extra:
        problems.append(f"unexpected tensors {sorted(extra)[:4]} for this config")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{wpath} does not match its config.json: {problems[0]}{more}; the "
                              "config was edited or belongs to another checkpoint: re-export it "
                              "with `specstream train`")


def _check_draft_vocab(cfg: StreamCheckpointConfig, tensors: dict[str, torch.Tensor],
                       wpath: Path) -> None:
    vocab = tensors.get(DRAFT_VOCAB_KEY)
    if cfg.draft_vocab_size is None:
        if vocab is not None:
            raise CheckpointError(f"{wpath} holds '{DRAFT_VOCAB_KEY}' but config.json has no "
                                  "draft_vocab_size; re-export the checkpoint")
        return
    if vocab is None or vocab.dim() != 1 or vocab.numel() != cfg.draft_vocab_size:
        raise CheckpointError(
            f"{wpath}: '{DRAFT_VOCAB_KEY}' must be a 1-D tensor of draft_vocab_size="
            f"{cfg.draft_vocab_size} token ids, found "
            f"{None if vocab is None else tuple(vocab.shape)}")
    if vocab.dtype not in (torch.int32, torch.int64):
        raise CheckpointError(f"{wpath}: '{DRAFT_VOCAB_KEY}' must hold integer token ids")
    if (vocab.numel() and (int(vocab.min()) < 0 or int(vocab.max()) >= cfg.base_model.vocab_size)) \
            or bool((vocab[1:] <= vocab[:-1]).any()):
        raise CheckpointError(f"{wpath}: '{DRAFT_VOCAB_KEY}' must be sorted, unique token ids "
                              f"below the base vocabulary size {cfg.base_model.vocab_size}")


def validate_against_base(cfg: StreamCheckpointConfig, base_model_dir: str | Path | None,
                          num_speculative_tokens: int | None = None,
                          check_fingerprint: bool = True) -> None:
    if num_speculative_tokens is not None:
        if num_speculative_tokens < 1:
            raise CheckpointError("num_speculative_tokens must be >= 1")
        if num_speculative_tokens > cfg.num_streams:
            raise CheckpointError(
                f"num_speculative_tokens={num_speculative_tokens} but the checkpoint has only "
                f"{cfg.num_streams} trained streams; ask for <= {cfg.num_streams} or train more "
                "streams (recipe field `num_streams`)")
    if base_model_dir is None:
        return
    base_dir = Path(base_model_dir)
    if not (base_dir / "config.json").is_file():
        return  # a hub name we cannot read here; the architecture check happens in vLLM
    ref = base_model_ref(base_dir) if check_fingerprint else None
    base_cfg = _read_base_config(base_dir)
    dims = dims_of(base_cfg)
    if cfg.num_stream_layers > (dims.num_hidden_layers or 0):
        raise CheckpointError(
            f"checkpoint uses num_stream_layers={cfg.num_stream_layers} but base model {base_dir} "
            f"has only {dims.num_hidden_layers} layers")
    if ref is not None and ref.fingerprint != cfg.base_model.fingerprint:
        raise BaseModelMismatchError(
            f"stream checkpoint was trained for base model '{cfg.base_model.name_or_path}' "
            f"({cfg.base_model.architecture}, {cfg.base_model.num_hidden_layers} layers, "
            f"fingerprint {cfg.base_model.fingerprint}) but is being loaded on '{base_dir}' "
            f"(fingerprint {ref.fingerprint}); serve the base model it was trained for or train "
            "streams for this model with `specstream train --base-model ...`")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        have = getattr(dims, key)
        if have is not None and have != getattr(cfg.base_model, key):
            raise BaseModelMismatchError(
                f"stream checkpoint says its base model has {key}={getattr(cfg.base_model, key)} "
                f"but {base_dir} has {key}={have}; serve the base model the streams "
                "were trained for (or train streams for this one with `specstream train`)")


def reads_tokens(stream_input: str) -> bool:
    """Whether a stream form reads tokens through the map g (and carries ``token_map.*``)."""
    return stream_input in ("next_token", "chain")


def attends_streams(stream_input: str) -> bool:
    """Whether a form's streams attend to streams (themselves and lower streams of the same
    anchor) besides the main keys <= t; the ``anchor`` form's do not."""
    return stream_input != "anchor"


def next_token_features(embeddings: torch.Tensor) -> torch.Tensor:
    """n(E[x]) of the next-token-aware form: the input embedding of x_{t+1}, RMS-normalised
    per row in float32, so g's scale does not depend on the embedding's. Trainer, reference
    and vLLM proposer all call this one function."""
    e = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    return e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + TOKEN_MAP_EPS)
