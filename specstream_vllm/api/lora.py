"""``LoRAAdapter``: the SpecStream package's fine-tuning API as a thin front over the
trainer's *fine-tuned* mode (:mod:`specstream_vllm.training`).

Fine-tuned mode trains one LoRA shared by the main stream and the speculative streams
plus the stream embeddings (Eq. 5 with alpha0 = 1, alpha_j = 0.1), merges the LoRA into
the base weights and saves a full model directory whose ``specstream/`` folder holds the
streams. That directory is what :meth:`get_adapted_model` returns and what
``SpeculativeEngine(model=...)`` or ``vllm serve`` serve (no ``streams=`` needed).

    adapter = LoRAAdapter(rank=8)                       # embedded SmolLM2 by default
    adapter.train([("Q: 2+2?", "4"), ...], max_steps=50)
    model_dir = adapter.get_adapted_model()             # servable directory
    adapter.save_weights("my-adapter")                  # small: LoRA + stream tensors
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..errors import CheckpointError, ConfigError
from .errors import TrainingNotDoneError, reject_tree_parameters

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT, _STREAM = "peft.", "streams."

DataItem = Union[str, tuple, dict, Sequence[dict]]


class LoRAAdapter:
    """Fine-tune a base model with LoRA + speculative streams (trainer's fine-tuned mode).

    Args:
        base_model: local HF model directory; ``None`` = the embedded SmolLM2-135M-Instruct.
        rank, alpha, target_modules: the shared LoRA (``q_proj``, ``k_proj``, ``v_proj``,
            ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``).
        num_streams: streams trained (the largest ``gamma`` the result can serve).
        num_stream_layers: top layers that run the streams (MSA layers).
        output_dir: where training writes (default: a new temporary directory).
        **recipe_overrides: any other :class:`~specstream_vllm.training.recipe.Recipe` field
            (``lr``, ``seq_len``, ``batch_size``, ``loss``, ``dtype`` ...).
    """

    def __init__(self, base_model: Optional[str] = None, rank: int = 8, alpha: float = 16.0,
                 target_modules: Sequence[str] = ("q_proj", "v_proj"), num_streams: int = 4,
                 num_stream_layers: int = 4, output_dir: Optional[str] = None,
                 **recipe_overrides: Any):
        reject_tree_parameters(recipe_overrides, "LoRAAdapter")
        from ..training.recipe import recipe_from_dict

        self.output_dir = Path(output_dir or tempfile.mkdtemp(prefix="specstream-lora-"))
        raw = {"base_model": str(base_model) if base_model else "default", "mode": "finetuned",
               "num_streams": num_streams, "num_stream_layers": num_stream_layers,
               "lora": {"rank": rank, "alpha": alpha, "target_modules": list(target_modules)},
               "output_dir": str(self.output_dir), "eval_gammas": [], **recipe_overrides}
        self.recipe = recipe_from_dict(raw, "LoRAAdapter(...)")  # ConfigError on bad values
        self.base_dir = self.recipe.resolve_base_model()
        self._tensors: Optional[dict] = None   # "peft.*" LoRA + "streams.*" stream tensors
        self._model_dir: Optional[Path] = None
        self.result = None

    # ------------------------------------------------------------------ data
    def _tokenizer(self):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(self.base_dir))

    def _examples(self, data: Iterable[DataItem]) -> list:
        """(prompt, response) pairs, {"prompt", "response"} dicts, chat conversations ending
        in an assistant turn, or plain strings (the first token is the prompt)."""
        from ..training.data import Example

        tok = self._tokenizer()
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        out = []
        for i, item in enumerate(data):
            if isinstance(item, Example):
                out.append(item)
                continue
            if isinstance(item, str):
                ids = tok(item, add_special_tokens=False).input_ids
                out.append(Example(f"item{i}", ids[:1], ids[1:] + eos))
                continue
            if isinstance(item, dict) and "prompt" in item and "response" in item:
                prompt, response = item["prompt"], item["response"]
                msgs = [{"role": "user", "content": prompt}]
            elif isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
                prompt, response = item
                msgs = [{"role": "user", "content": prompt}]
            elif (isinstance(item, (list, tuple)) and item and all(isinstance(m, dict) for m in item)
                  and item[-1].get("role") == "assistant"):
                msgs, response = list(item[:-1]), item[-1]["content"]
            else:
                raise ConfigError(
                    f"training item {i} has an unsupported form ({type(item).__name__}); use "
                    "(prompt, response) pairs, {'prompt': ..., 'response': ...} dicts, chat "
                    "conversations ending with an assistant message, or plain strings")
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            p_ids = tok(text, add_special_tokens=False).input_ids
            r_ids = tok(response, add_special_tokens=False).input_ids + eos
            out.append(Example(f"item{i}", p_ids, r_ids))
        if not out:
            raise ConfigError("train() needs at least one training example")
        return out

    # ------------------------------------------------------------------ training
    def train(self, data: Optional[Iterable[DataItem]] = None, *, max_steps: Optional[int] = None,
              epochs: Optional[float] = None, lr: Optional[float] = None,
              batch_size: Optional[int] = None, seq_len: Optional[int] = None,
              time_budget_minutes: Optional[float] = None, log=print, progress: bool = False,
              **recipe_overrides: Any):
        """Train; returns the trainer's ``TrainResult``. ``data=None`` uses the trainer's
        self-distilled ShareGPT set (generated with vLLM on first use: slow on a CPU)."""
        reject_tree_parameters(recipe_overrides, "LoRAAdapter.train")
        from ..training.recipe import recipe_from_dict
        from ..training.trainer import train as run_training

        upd = {k: v for k, v in dict(max_steps=max_steps, epochs=epochs, lr=lr, batch_size=batch_size,
                                     seq_len=seq_len, time_budget_minutes=time_budget_minutes).items()
               if v is not None}
        upd.update(recipe_overrides)
        self.recipe = recipe_from_dict({**self.recipe.model_dump(mode="json"), **upd}, "LoRAAdapter.train(...)")
        examples = None if data is None else self._examples(data)
        self.result = run_training(self.recipe, examples, log=log, progress=progress,
                                   base_dir=self.base_dir)
        self._model_dir = Path(self.recipe.output_dir) / "model"
        self._tensors = self._tensors_from_state(Path(self.recipe.output_dir))
        return self.result

    @staticmethod
    def _tensors_from_state(out_dir: Path) -> dict:
        import torch

        from ..training.trainer import STATE_NAME
        st = torch.load(out_dir / STATE_NAME, weights_only=False)
        tensors = {_PEFT + k: v.detach().float().contiguous() for k, v in (st.get("peft") or {}).items()}
        tensors.update({_STREAM + k: v.detach().float().contiguous() for k, v in st["params"].items()})
        return tensors

    # ------------------------------------------------------------------ weights
    def _require(self) -> dict:
        if self._tensors is None:
            raise TrainingNotDoneError("no adapter weights yet: call train(...) or load_weights(path) first")
        return self._tensors

    def save_weights(self, path: str) -> Path:
        """Save the LoRA and stream tensors (not the merged model) plus their config."""
        from safetensors.torch import save_file

        from ..checkpoint import base_fingerprint
        tensors = self._require()
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(p / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        meta = {"format": "specstream-lora-adapter", "version": 1,
                "recipe": self.recipe.model_dump(mode="json"),
                "base_model": str(self.base_dir), "base_fingerprint": base_fingerprint(self.base_dir)}
        (p / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return p

    def load_weights(self, path: str) -> "LoRAAdapter":
        """Load weights written by :meth:`save_weights` (checked against this base model)."""
        from safetensors.torch import load_file

        from ..checkpoint import base_fingerprint
        from ..training.recipe import recipe_from_dict
        p = Path(path)
        if not (p / ADAPTER_CONFIG).is_file() or not (p / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"{p} is not a LoRAAdapter directory (needs {ADAPTER_CONFIG} "
                                  f"and {ADAPTER_WEIGHTS}, as written by save_weights)")
        meta = json.loads((p / ADAPTER_CONFIG).read_text())
        if meta.get("base_fingerprint") != base_fingerprint(self.base_dir):
            raise CheckpointError(f"adapter {p} was trained on {meta.get('base_model')!r}, not on "
                                  f"{str(self.base_dir)!r}; create LoRAAdapter(base_model=...) for that model")
        recipe = dict(meta["recipe"], base_model=self.recipe.base_model,
                      output_dir=self.recipe.output_dir)
        self.recipe = recipe_from_dict(recipe, f"{p / ADAPTER_CONFIG}")
        self._tensors = load_file(str(p / ADAPTER_WEIGHTS))
        self._model_dir = None  # materialized on demand
        return self

    # ------------------------------------------------------------------ outputs
    def get_adapted_model(self, as_: str = "path"):
        """The servable model directory (merged LoRA + ``specstream/`` streams).

        ``as_="path"`` (default) returns the directory (a ``Path``) for
        ``SpeculativeEngine(model=...)`` / ``vllm serve``; ``as_="transformers"`` loads the
        merged model with transformers (main stream only, no speculation)."""
        self._require()
        if self._model_dir is None or not (self._model_dir / "specstream" / "config.json").is_file():
            self._model_dir = self._materialize()
        if as_ == "path":
            return self._model_dir
        if as_ == "transformers":
            from transformers import AutoModelForCausalLM
            return AutoModelForCausalLM.from_pretrained(str(self._model_dir))
        raise ConfigError(f"as_={as_!r}; choose 'path' or 'transformers'")

    def _materialize(self) -> Path:
        """Merge loaded weights into the base model and save a servable directory, with the
        trainer's own export (the same code path training ends with)."""
        import torch
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        from ..reference.streams import StreamParams
        from ..training.checkpoint_io import export as _export
        from ..training.device import CPU_DTYPES as _DTYPES, load_base_model
        tensors = self._require()
        r = self.recipe
        model = load_base_model(self.base_dir, _DTYPES[r.dtype])
        cfg = model.config
        model = get_peft_model(model, LoraConfig(r=r.lora.rank, lora_alpha=r.lora.alpha,
                                                 target_modules=list(r.lora.target_modules),
                                                 lora_dropout=0.0, bias="none"))
        set_peft_model_state_dict(model, {k[len(_PEFT):]: v for k, v in tensors.items() if k.startswith(_PEFT)})
        params = StreamParams(cfg, r.num_streams, r.num_stream_layers, None)
        params.load_state_dict({k[len(_STREAM):]: v for k, v in tensors.items() if k.startswith(_STREAM)})
        out_dir = Path(r.output_dir)
        if (out_dir / "model").exists():
            shutil.rmtree(out_dir / "model")
        n_stream = sum(p.numel() for p in params.parameters())
        with torch.no_grad():
            _export(r, model, params, self.base_dir, out_dir, step=0, history=[], n_stream=n_stream,
                    seconds=0.0, final=True)
        return out_dir / "model"

    def get_parameter_stats(self) -> dict:
        """Exact parameter counts from tensor shapes: base model, LoRA (per target module
        and layer: rank * (in + out)), stream tensors, and the trainable share."""
        from safetensors import safe_open

        from ..checkpoint import _weight_files
        files = _weight_files(self.base_dir)
        shapes: dict[str, tuple] = {}
        for name, f in files.items():
            with safe_open(str(f), "pt") as h:
                shapes[name] = tuple(h.get_slice(name).get_shape())
        base = sum(math.prod(s) for s in shapes.values())
        r = self.recipe
        lora = 0
        for name, s in shapes.items():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in r.lora.target_modules and parts[-1] == "weight" \
                    and ".layers." in name:
                lora += r.lora.rank * (s[0] + s[1])
        hidden = shapes["model.embed_tokens.weight"][1]
        streams = r.num_streams * hidden
        if self._tensors is not None:  # the real tensors, when we have them
            lora = sum(v.numel() for k, v in self._tensors.items() if k.startswith(_PEFT))
            streams = sum(v.numel() for k, v in self._tensors.items() if k.startswith(_STREAM))
        trainable = lora + streams
        return {"base_parameters": base, "lora_parameters": lora, "stream_parameters": streams,
                "trainable_parameters": trainable, "trainable_fraction": trainable / base,
                "lora_rank": r.lora.rank, "lora_alpha": r.lora.alpha,
                "target_modules": list(r.lora.target_modules), "num_streams": r.num_streams,
                "num_stream_layers": r.num_stream_layers, "trained": self._tensors is not None}
