"""Architecture-independent parts of the Multi-Stream Attention (MSA) vLLM models.

The MSA model *is* the served target model (same weights, same KV cache) plus:

* ``stream_embeddings`` ``[γ, d]``: the e_j of the paper, replicated on every rank;
* an optional stream-only LoRA on the top N_s layers, stored already sharded the
  way vLLM shards the base linear it corrects (column-parallel: B rows of this
  rank; row-parallel: A columns of this rank, the rank-r partial is all-reduced);
* the hidden state entering layer ``L - N_s`` as an auxiliary output of the main
  forward (vLLM's EAGLE-3 mechanism, or a decoder subclass for families without it:
  stream_layers.py), which the proposer turns into stream inputs;
* in the next-token-aware form, the map g of the token sampled at the anchor
  (``token_map_A/B``, float32, replicated; the input embedding is the target's own);
* the checkpoint's draft vocabulary, if any: drafts are the argmax over those LM-head
  rows only (gathered per call, no weight copy), which is what the streams were
  trained on and several times cheaper than the full head.

Settings reach the model through ``hf_config.specstream`` (set by the config patch
in the front-end process); the stream tensors are read from the checkpoint in
``load_weights`` after the base weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from specstream_vllm.checkpoint import (DRAFT_VOCAB_KEY, EMBEDDINGS_KEY, TOKEN_MAP_A_KEY,
                                        TOKEN_MAP_B_KEY, attends_streams, load_checkpoint,
                                        next_token_features, reads_tokens)


@dataclass(frozen=True)
class StreamSettings:
    checkpoint: str
    num_streams: int
    num_stream_layers: int
    num_layers: int
    lora_rank: int = 0
    lora_scaling: float = 1.0
    lora_targets: tuple[str, ...] = ()
    min_draft_prob: float = 0.0
    stream_input: str = "paper"
    token_map_rank: int = 0
    draft_precision: str = "auto"   # see vllm_integration/config.SpecStreamSettings
    #: ``separate`` | ``fused`` | ``auto`` (vllm_integration/config.SpecStreamSettings)
    draft_pass: str = "separate"

    @property
    def query_only(self) -> bool:
        """Stream rows attend to main keys <= the anchor only (the ``anchor`` form): no
        cache writes, and they can ride inside the verification forward."""
        return not attends_streams(self.stream_input)

    @property
    def next_token_aware(self) -> bool:
        """The streams read tokens through g (``next_token`` and ``chain`` forms)."""
        return reads_tokens(self.stream_input)

    @property
    def chain(self) -> bool:
        """Stream j reads the token at t+j: drafted one stream per pass."""
        return self.stream_input == "chain"

    @property
    def first_layer(self) -> int:
        return self.num_layers - self.num_stream_layers

    @classmethod
    def from_hf_config(cls, hf_config) -> "StreamSettings":
        raw = getattr(hf_config, "specstream", None)
        if not raw:
            raise RuntimeError("the SpecStream model class was selected without stream settings; "
                               "use speculative_config={'method': 'specstream', ...}")
        raw = dict(raw)
        raw["lora_targets"] = tuple(raw.get("lora_targets") or ())
        return cls(**raw)


def _tp() -> tuple[int, int]:
    from vllm.distributed import (get_tensor_model_parallel_rank,
                                  get_tensor_model_parallel_world_size)
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import tensor_model_parallel_all_reduce
    return tensor_model_parallel_all_reduce(x)


class ShardedLoRA(nn.Module):
    """``y += scale * (x @ A^T) @ B^T`` matching the TP layout of one vLLM linear.

    ``out_slices`` lists, for a fused column-parallel output (qkv, gate_up), the
    (full-B row range) that lands in this rank's output, in output order; for a
    row-parallel linear ``in_slice`` is this rank's input range and the rank-r
    partial product is all-reduced before B.
    """

    def __init__(self, rank: int, scaling: float, in_features: int,
                 out_slices: list[tuple[str, int, int]] | None = None,
                 in_slice: tuple[int, int] | None = None, full_out: int = 0):
        super().__init__()
        self.scaling = scaling
        self.out_slices = out_slices
        self.in_slice = in_slice
        a_in = in_features if in_slice is None else in_slice[1] - in_slice[0]
        self.register_buffer("A", torch.zeros(rank, a_in), persistent=False)
        b_out = full_out if out_slices is None else sum(e - s for _, s, e in out_slices)
        self.register_buffer("B", torch.zeros(b_out, rank), persistent=False)
        self.present = False

    def load(self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``parts[name] = (A [r, in_full], B [out_full, r])`` for each fused member."""
        dev = self.A.device
        if self.out_slices is not None:  # column parallel, possibly fused (qkv, gate_up)
            names = [n for n, _, _ in self.out_slices if n in parts]
            r = parts[names[0]][0].shape[0]
            A = torch.cat([parts[n][0] for n in names], 0)  # [r * members, in]
            B = torch.zeros(sum(e - s for _, s, e in self.out_slices), r * len(names))
            row = 0
            for name, s, e in self.out_slices:  # block-diagonal: member k uses A rows k*r..
                if name in parts:
                    k = names.index(name)
                    B[row:row + e - s, k * r:(k + 1) * r] = parts[name][1][s:e]
                row += e - s
            self.A = A.to(dev, torch.float32)
            self.B = B.to(dev, torch.float32)
        else:  # row parallel, single member
            (a, b), = parts.values()
            if self.in_slice is not None:
                a = a[:, self.in_slice[0]:self.in_slice[1]]
            self.A = a.to(dev, torch.float32).contiguous()
            self.B = b.to(dev, torch.float32).contiguous()
        self.present = True

    def merged_delta(self) -> torch.Tensor | None:
        """``scaling * B @ A`` as a change of the local weight shard ``[out, in]``: what a
        copy of the linear with the LoRA merged in adds (row parallel: this rank's input
        columns; the all-reduce of the linear's output sums them)."""
        return (self.B @ self.A) * self.scaling if self.present else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32: rank-r products are tiny, and CPU bf16 GEMMs this small are ~10x slower
        h = x.to(self.A.dtype) @ self.A.t()
        if self.in_slice is not None:
            h = _all_reduce(h)
        return ((h @ self.B.t()) * self.scaling).to(x.dtype)


class MSAMixin:
    """Mixed into a vLLM ``*ForCausalLM`` (before it in the MRO)."""

    stream_settings: StreamSettings

    def _init_streams(self, vllm_config) -> None:
        cfg = vllm_config.model_config.hf_config
        self.stream_settings = s = StreamSettings.from_hf_config(cfg)
        dtype = vllm_config.model_config.dtype
        self.register_buffer("stream_embeddings",
                             torch.zeros(s.num_streams, cfg.hidden_size, dtype=dtype),
                             persistent=False)
        self.stream_draft_vocab: torch.Tensor | None = None
        r = s.token_map_rank if s.next_token_aware else 0
        self.register_buffer("token_map_A", torch.zeros(r, cfg.hidden_size), persistent=False)
        self.register_buffer("token_map_B", torch.zeros(cfg.hidden_size, r), persistent=False)
        self.stream_lora = nn.ModuleDict()
        if s.lora_rank:
            for li in range(s.first_layer, s.num_layers):
                for key, mod in self._lora_modules_for_layer(cfg, li, s).items():
                    self.stream_lora[key] = mod  # float32, see ShardedLoRA.forward
        self._set_aux_layer()

    # ---- vLLM's EAGLE-3 aux-hidden-state interface: always our one layer ----
    def set_aux_hidden_state_layers(self, layers) -> None:
        self._set_aux_layer()

    def get_eagle3_default_aux_hidden_state_layers(self) -> tuple[int, ...]:
        return (self.stream_settings.first_layer,)

    def get_eagle3_aux_hidden_state_layers(self) -> tuple[int, ...]:
        return (self.stream_settings.first_layer,)

    def _load_streams(self) -> None:
        s = self.stream_settings
        _, tensors = load_checkpoint(s.checkpoint, check_fingerprint=False)
        emb = tensors[EMBEDDINGS_KEY][: s.num_streams]
        self.stream_embeddings.copy_(emb.to(self.stream_embeddings.dtype))
        if s.next_token_aware:
            self.token_map_A.copy_(tensors[TOKEN_MAP_A_KEY].float())
            self.token_map_B.copy_(tensors[TOKEN_MAP_B_KEY].float())
        groups: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for li in range(s.first_layer, s.num_layers):
            for name in s.lora_targets:
                key = self._lora_key(li, name)
                a = tensors[f"layers.{li}.{name}.lora_A"]
                b = tensors[f"layers.{li}.{name}.lora_B"]
                groups.setdefault(key, {})[name] = (a, b)
        for key, parts in groups.items():
            self.stream_lora[key].load(parts)
        vocab = tensors.get(DRAFT_VOCAB_KEY)
        if vocab is not None:
            self.stream_draft_vocab = vocab.to(self.stream_embeddings.device, torch.int64)
        # with one rank the LM head holds every row: draft over the vocabulary's rows only
        self._local_draft_head = _tp()[1] == 1

    def stream_inputs(self, h: torch.Tensor, next_token_ids: torch.Tensor, g: int,
                      first: int = 0) -> torch.Tensor:
        """``[R * g, d]`` inputs of streams ``first+1 .. first+g``: h_t + e_j (+ g(x) of the
        token ids ``[R]`` in the token-reading forms: x_{t+1}, or in the chain form, where
        one stream runs per pass, the token at that stream's position), in the order and
        dtype of the reference model (reference/streams.py)."""
        x = h[:, None, :] + self.stream_embeddings[first:first + g].to(h.dtype)
        if self.stream_settings.next_token_aware:
            x = x + self._token_map(next_token_ids).to(h.dtype)[:, None, :]
        return x.reshape(-1, h.shape[-1])

    def stream_row_inputs(self, h_rows: torch.Tensor, next_rows: torch.Tensor | None,
                          stream_idx: torch.Tensor) -> torch.Tensor:
        """:meth:`stream_inputs` row by row: row i is stream ``stream_idx[i] + 1`` of the
        anchor whose hidden state is ``h_rows[i]`` (next token ``next_rows[i]``). Every input
        has one row per stream token, so the compiled pass, which takes them in, sees one
        dynamic size, as it does for the flattened inputs."""
        x = h_rows + self.stream_embeddings[stream_idx].to(h_rows.dtype)
        if self.stream_settings.next_token_aware:
            x = x + self._token_map(next_rows).to(h_rows.dtype)
        return x

    def _token_map(self, next_token_ids: torch.Tensor) -> torch.Tensor:
        """g(x) of the next-token-aware forms, float32 (as in the reference)."""
        emb = self.input_embedding()(next_token_ids)  # vocab-parallel: whole rows on every rank
        return next_token_features(emb).to(self.token_map_A.dtype) @ self.token_map_A.t() \
            @ self.token_map_B.t()

    def draft_token_ids(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Top-1 token of each stream hidden state (final-normed) over the draft vocabulary,
        with its probability under the softmax over that vocabulary (float32)."""
        vocab = self.stream_draft_vocab
        local = self.local_draft_head()
        if local is not None:
            return draft_top1(hidden, *local, vocab)
        else:
            logits = self.compute_logits(hidden)  # full head: vocab-parallel shards gathered
            if logits is None:  # ranks that do not receive the gathered logits
                return None
            logits = logits.float()
            if vocab is not None:
                logits = logits.index_select(-1, vocab)
        return _top1(logits, vocab)

    def local_draft_head(self):
        """(head, bias) over the draft vocabulary's rows where this rank holds them all
        (one rank, a draft vocabulary), else None: the full head's logits are gathered."""
        vocab = self.stream_draft_vocab
        if vocab is None or not self._local_draft_head:
            return None
        return self._draft_head(vocab)

    def _draft_head(self, vocab: torch.Tensor):
        """``hidden -> logits`` over the LM head's rows of the draft vocabulary (and those
        rows' bias, if any), built once: copying 8,192 x d rows every step cost about as
        much as the matmul, and multiplying by the rows' transposed view is ~2.5x slower
        than by a contiguous ``[d, V']`` on CPU (1.5 vs 0.6 ms for SmolLM2 at batch 1). Where
        the stream layers have their own copies (``draft_dtype``, a CPU) the rows are a
        oneDNN copy in that dtype too (bf16: 119 vs 466 us through torch.matmul). Rebuilt if
        the head's weights were replaced or written in place."""
        w = self.lm_head.weight
        bias = getattr(self.lm_head, "bias", None)
        try:
            version = w._version
        except RuntimeError:  # inference tensors keep no version counter
            version = None
        key = (w.data_ptr(), version, vocab.data_ptr())
        if getattr(self, "_draft_head_cache", (None, None))[0] != key:
            rows = w.index_select(0, vocab)
            head = None
            if getattr(self, "draft_dtype", None) is not None:
                from specstream_vllm.vllm_integration.patches.kernels import onednn_matmul
                head = onednn_matmul(rows, self.draft_dtype)
            if head is None:
                w_t = rows.t().contiguous()
                head = lambda h, w_t=w_t: h.to(w_t.dtype) @ w_t  # noqa: E731
            self._draft_head_cache = (key, (head, None if bias is None else bias.index_select(0, vocab)))
        return self._draft_head_cache[1]

    def stream_lora_delta(self, layer: int, fused: str, x: torch.Tensor) -> torch.Tensor | None:
        key = f"{layer}_{fused}"
        mod = self.stream_lora[key] if key in self.stream_lora else None
        return mod(x) if mod is not None else None

    # stream_layers.StreamModel implements these
    def _set_aux_layer(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def input_embedding(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _lora_key(self, layer: int, name: str) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _lora_modules_for_layer(self, cfg, layer: int, s: StreamSettings) -> dict[str, nn.Module]:
        raise NotImplementedError  # pragma: no cover


def draft_top1(hidden: torch.Tensor, head, bias: torch.Tensor | None,
               vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 token id and its probability through a draft vocabulary's head."""
    logits = head(hidden).float()
    if bias is not None:  # LM heads with a bias (Phi)
        logits = logits + bias.float()
    return _top1(logits, vocab)


def _top1(logits: torch.Tensor, vocab: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    top, idx = logits.max(dim=-1)
    prob = torch.exp(top - torch.logsumexp(logits, dim=-1))
    return (idx if vocab is None else vocab[idx]), prob
