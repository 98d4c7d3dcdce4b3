"""One Multi-Stream Attention mechanism for every family, driven by a :class:`Layout`.

A family differs from another only in where things are (attribute paths), how the
residual stream is carried (vLLM's fused add-RMSNorm, plain pre-LN adds, or attention
and MLP side by side), whether its MLP is gated, and how positions enter (rotary at
t+j; learned absolute, i.e. nowhere in the layers; ALiBi, applied by vLLM's
``Attention`` from the key's cache position). The stream pass, the stream LoRA's TP
layout and the aux hidden state are written once here; a family module is a Layout
plus one class per served architecture.

Stream LoRA slots (canonical names -> the vLLM linear they correct):
``qkv`` (q/k/v members of the QKVParallelLinear), ``o`` (o_proj), ``mlp_in`` (gate/up,
or up alone) and ``mlp_out`` (down). Shards follow the linear's own TP sizes.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn

from specstream_vllm import envs

from .msa import MSAMixin, ShardedLoRA, StreamSettings, _tp, draft_top1
from .stream_rows import StreamRows

# under "vllm" so the messages reach vLLM's log handler in workers and servers
logger = logging.getLogger("vllm.specstream")

_SLOT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its parts in vLLM's model (dotted attribute paths).

    ``decoder`` is relative to the ``*ForCausalLM``; ``layers``, ``embedding`` (the raw
    token embedding the next-token map reads) and ``final_norm`` to the decoder; the
    rest to one decoder layer. ``mlp`` is (in linear, activation, out linear).
    """
    decoder: str
    layers: str
    embedding: str
    final_norm: str
    norms: tuple[str, str]
    attn: str
    qkv: str
    o_proj: str
    mlp: tuple[str, str, str]
    gated_mlp: bool
    positions: Literal["rope", "learned", "alibi"]
    #: fused: vLLM's add-RMSNorm carries the residual; plain: pre-LN adds; parallel: one
    #: norm feeds attention and MLP side by side (Phi), both added to the residual
    residual: Literal["fused", "plain", "parallel"] = "plain"
    #: per-head q/k norms applied before rotary (attribute names on the attention module;
    #: absent modules are skipped: Phi has them only with qk_layernorm=true)
    qk_norm: tuple[str, str] | None = None
    #: vLLM's EAGLE-3 aux output exists (EagleModelMixin); otherwise the decoder is
    #: built as ``StreamModel.aux_forward_class`` (same modules, forward also returns
    #: the aux hidden state)
    eagle_aux: bool = False


@dataclass
class LayerParts:
    """One decoder layer's modules the stream pass calls, resolved once: walking the
    layout's attribute paths on every call cost about 0.3 ms of a SmolLM2 pass in eager
    mode. ``pass_norms`` are the norms of a pass of stream rows alone (vLLM-CPU's C RMSNorm
    where it applies, patches.kernels.stream_rms_norm); rows the verification forward
    shares (the fused pass) keep the modules, ``norms``."""
    norms: tuple
    pass_norms: tuple
    attn: nn.Module
    qkv: nn.Module
    o_proj: nn.Module
    mlp_in: nn.Module
    act: nn.Module
    mlp_out: nn.Module


def get(obj, path: str):
    """``get(layer, "mlp.c_fc")``; a plain loop (traced by torch.compile)."""
    for name in path.split(".") if path else ():
        obj = getattr(obj, name)
    return obj


class StreamModel(MSAMixin):
    """Mixed in before a vLLM ``*ForCausalLM``; the family sets ``layout``."""

    layout: Layout
    #: for families without vLLM's aux output: a subclass of the decoder's class whose
    #: forward returns ``(hidden, [h entering the first stream layer])``, built in its place
    aux_forward_class: type | None = None

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        if self.layout.eagle_aux:
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        else:
            from vllm.distributed.parallel_state import get_pp_group
            if get_pp_group().world_size > 1:
                raise ValueError(f"specstream on {type(self).__name__} does not support "
                                 "pipeline parallelism (tensor parallelism is supported)")
            with _built_as(self.aux_forward_class):
                super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_streams(vllm_config)
        if not self.layout.eagle_aux:
            self.stream_decoder().stream_first_layer = self.stream_settings.first_layer
        attn = get(self.stream_layers()[self.stream_settings.first_layer], self.layout.attn)
        if self.layout.qk_norm is None and (hasattr(attn, "q_norm") or hasattr(attn, "k_norm")):
            raise ValueError(f"q/k-norm attention is not supported by {type(self).__name__}")
        #: query-only stream rows in flight (anchor form, either pass; stream_rows.py)
        self.stream_rows: StreamRows | None = None
        #: ``(layer, q, k, v) -> output``: the separate pass's attention where the proposer
        #: found a direct path to the backend's kernels (else vLLM's ``Attention``)
        self.stream_attend: Callable | None = None
        if self.stream_settings.draft_pass != "separate":
            self._ride_top_layers()
        self._layer_parts: dict[int, LayerParts] = {}
        self._compiled_stream_draft = None
        if not vllm_config.model_config.enforce_eager and envs.get("SPECSTREAM_COMPILE_DRAFT"):
            self._compiled_stream_draft = torch.compile(
                self._stream_draft, dynamic=True,
                options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def stream_decoder(self) -> nn.Module:
        """The module holding the decoder layers (GPT-2's ``transformer``, OPT's ``model.decoder``)."""
        return get(self, self.layout.decoder)

    def stream_layers(self) -> nn.ModuleList:
        return get(self.stream_decoder(), self.layout.layers)

    def input_embedding(self) -> nn.Module:
        return get(self.stream_decoder(), self.layout.embedding)

    def _set_aux_layer(self) -> None:
        if self.layout.eagle_aux:
            self.stream_decoder()._set_aux_hidden_state_layers((self.stream_settings.first_layer,))

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self._load_streams()
        self._set_draft_precision()
        self._resolve_layer_parts()
        return loaded

    def _resolve_layer_parts(self) -> None:
        from specstream_vllm.vllm_integration.patches.kernels import stream_rms_norm
        L, s = self.layout, self.stream_settings
        fast = 0
        for li in range(s.first_layer, s.num_layers):
            lay = self.stream_layers()[li]
            attn = get(lay, L.attn)
            norms = tuple(get(lay, n) for n in L.norms)
            pass_norms = tuple(stream_rms_norm(n) or n for n in norms)
            fast += sum(a is not b for a, b in zip(norms, pass_norms))
            self._layer_parts[li] = LayerParts(
                norms, pass_norms, attn, get(attn, L.qkv), get(attn, L.o_proj),
                *(get(lay, p) for p in L.mlp))
        final = get(self.stream_decoder(), L.final_norm)
        self._final_norms = (final, (stream_rms_norm(final) if final is not None else None) or final)
        fast += self._final_norms[1] is not final
        if fast:
            logger.info("specstream: the stream pass runs vLLM-CPU's C RMSNorm (%d norms)", fast)

    def _parts(self, li: int) -> LayerParts:
        parts = self._layer_parts.get(li)
        if parts is None:       # before load_weights (dummy runs): resolved on first use
            self._resolve_layer_parts()
            parts = self._layer_parts[li]
        return parts

    def _set_draft_precision(self) -> None:
        """On a CPU (``draft_precision`` auto, bfloat16 or int8) each stream-layer linear
        gets its own oneDNN copy with the stream LoRA merged in (patches.kernels.draft_linear),
        the draft head's rows likewise; ``auto`` takes int8 where the CPU has native int8
        dot products (VNNI, AMX), else bf16 where it has native bf16 ones or bf16 is served,
        else the served dtype, and the next of these where a kernel fails its probe. At
        batch 1 a pass is bound by reading its layers' weights and, in eager mode, by the
        number of small operations: the unmerged LoRA added 96 matmuls and 300 casts to
        SmolLM2's 12-layer pass (about a third of its 8.4 ms in bf16); bf16 halves a float32
        model's bytes and int8 halves bf16's. The copies cost the stream layers' weights
        once more in memory, which is why accelerators (CUDA graphs fuse the small
        operations, memory is dear) and ``exact`` keep the served weights with the LoRA
        beside them. Here, in ``load_weights``, because vLLM-CPU drops the weights right
        after it."""
        from vllm.platforms import current_platform

        from specstream_vllm.vllm_integration.patches import kernels
        want = self.stream_settings.draft_precision
        served = self.stream_embeddings.dtype
        self.draft_dtype = None
        self._draft_head_cache = (None, None)
        if want == "exact" or not current_platform.is_cpu():
            if want in ("bfloat16", "int8"):
                logger.warning("specstream: draft_precision %s is a CPU setting; the stream "
                               "pass runs in the served dtype (%s) here", want, served)
            return
        if want != "auto":
            choices = [torch.int8 if want == "int8" else torch.bfloat16]
        else:
            choices = [torch.int8] if kernels.native_int8_cpu() else []
            choices.append(torch.bfloat16 if kernels.native_bf16_cpu() else served)
        L = self.layout
        linears = []
        for li in range(self.stream_settings.first_layer, self.stream_settings.num_layers):
            lay = self.stream_layers()[li]
            attn = get(lay, L.attn)
            linears += [(li, "qkv", get(attn, L.qkv)), (li, "o", get(attn, L.o_proj)),
                        (li, "mlp_in", get(lay, L.mlp[0])), (li, "mlp_out", get(lay, L.mlp[2]))]
        numel = sum(getattr(lin, "weight", torch.empty(0)).numel() for _, _, lin in linears)
        for dtype in choices:
            nbytes = numel * dtype.itemsize
            if not kernels.copies_fit(nbytes):
                logger.warning("specstream: no copies of the stream layers (%.0f MB in %s "
                               "would take more than a quarter of the memory available); the "
                               "stream pass runs vLLM's linears with the stream LoRA beside "
                               "them", nbytes / 2**20, dtype)
                return
            made = 0
            for li, slot, lin in linears:
                key = f"{li}_{slot}"
                lora = self.stream_lora[key] if key in self.stream_lora else None
                delta = lora.merged_delta() if lora is not None else None
                lin.specstream_draft = kernels.draft_linear(lin, delta, dtype)
                made += lin.specstream_draft is not None
            if made:
                self.draft_dtype = dtype
                logger.info("specstream: stream layers run their own %s copies (%d linears, "
                            "%.0f MB, stream LoRA merged in)", dtype, made, nbytes / 2**20)
                return
        logger.warning("specstream: draft_precision %s: no oneDNN copies of the stream "
                       "layers here; the stream pass runs vLLM's linears (%s) with the "
                       "stream LoRA beside them", want, served)

    # ---- stream LoRA: one ShardedLoRA per vLLM linear, shaped by that linear ----
    def _lora_key(self, layer: int, name: str) -> str:
        return f"{layer}_{_SLOT[name]}"

    def _lora_modules_for_layer(self, cfg, layer: int, s: StreamSettings) -> dict[str, nn.Module]:
        L = self.layout
        lay = self.stream_layers()[layer]
        attn = get(lay, L.attn)
        targets = set(s.lora_targets)
        r, sc = s.lora_rank, s.lora_scaling
        if not L.gated_mlp and "gate_proj" in targets:
            raise ValueError(f"{type(self).__name__} has no gate_proj (ungated MLP) to put a "
                             "stream LoRA on")
        rank, _ = _tp()
        out: dict[str, nn.Module] = {}
        if targets & {"q_proj", "k_proj", "v_proj"}:
            qkv = get(attn, L.qkv)
            hd, hq, kv_local = qkv.head_size, qkv.num_heads, qkv.num_kv_heads
            kv0 = (rank // qkv.num_kv_head_replicas) * kv_local
            slices = [("q_proj", rank * hq * hd, (rank + 1) * hq * hd),
                      ("k_proj", kv0 * hd, (kv0 + kv_local) * hd),
                      ("v_proj", kv0 * hd, (kv0 + kv_local) * hd)]
            out[f"{layer}_qkv"] = ShardedLoRA(r, sc, qkv.input_size, out_slices=slices)
        if "o_proj" in targets:
            out[f"{layer}_o"] = _row_parallel(get(attn, L.o_proj), r, sc, rank)
        mlp_in = get(lay, L.mlp[0])
        if L.gated_mlp and targets & {"gate_proj", "up_proj"}:
            i_loc = mlp_in.output_size_per_partition // 2
            slices = [("gate_proj", rank * i_loc, (rank + 1) * i_loc),
                      ("up_proj", rank * i_loc, (rank + 1) * i_loc)]
            out[f"{layer}_mlp_in"] = ShardedLoRA(r, sc, mlp_in.input_size, out_slices=slices)
        elif not L.gated_mlp and "up_proj" in targets:
            i_loc = mlp_in.output_size_per_partition
            out[f"{layer}_mlp_in"] = ShardedLoRA(
                r, sc, mlp_in.input_size, out_slices=[("up_proj", rank * i_loc, (rank + 1) * i_loc)])
        if "down_proj" in targets:
            out[f"{layer}_mlp_out"] = _row_parallel(get(lay, L.mlp[2]), r, sc, rank)
        return out

    def _stream_linear(self, li: int, slot: str, linear, x: torch.Tensor,
                       num_main: int = 0) -> torch.Tensor:
        """One stream-layer linear with its stream LoRA: the CPU copy with the LoRA merged in
        for a pass of stream rows alone; in the fused pass (main rows ride along) the
        served linear, the LoRA beside it for the stream rows."""
        if num_main == 0:
            own = getattr(linear, "specstream_draft", None)
            if own is not None:
                return own(x)
        return self._with_lora(li, slot, x, _out(linear(x)), num_main)

    def _with_lora(self, layer: int, slot: str, x: torch.Tensor, y: torch.Tensor,
                   num_main: int = 0) -> torch.Tensor:
        """``y`` plus the stream LoRA's correction of the stream rows (rows ``num_main:``;
        the main rows before them, in the fused pass, keep the base linear's output)."""
        if num_main == 0:
            delta = self.stream_lora_delta(layer, slot, x)
            return y if delta is None else y + delta.to(y.dtype)
        delta = self.stream_lora_delta(layer, slot, x[num_main:])
        if delta is not None:
            y[num_main:] += delta.to(y.dtype)
        return y

    # ---- the stream pass ----
    def _stream_attention(self, li: int, p: LayerParts, positions: torch.Tensor,
                          h: torch.Tensor, num_main: int = 0) -> torch.Tensor:
        L = self.layout
        attn, qkv_linear = p.attn, p.qkv
        qkv = self._stream_linear(li, "qkv", qkv_linear, h, num_main)
        hd = qkv_linear.head_size
        q_size, kv_size = qkv_linear.num_heads * hd, qkv_linear.num_kv_heads * hd
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if L.qk_norm is not None:  # Qwen3, Phi: per-head norms of q and k, before rotary
            q_norm, k_norm = (getattr(attn, n, None) for n in L.qk_norm)
            if q_norm is not None:
                q = q_norm(q.view(*q.shape[:-1], q.shape[-1] // hd, hd)).view(q.shape)
            if k_norm is not None:
                k = k_norm(k.view(*k.shape[:-1], k.shape[-1] // hd, hd)).view(k.shape)
        if L.positions == "rope":  # stream j at t+j; ALiBi: the kernel reads the slot's position
            q, k = self._rotary(attn, positions, q, k)
        rows = self.stream_rows
        if rows is None and self.stream_attend is not None:
            o = self.stream_attend(li, q, k, v)  # the backend's kernels, called directly
        elif rows is None:
            o = attn.attn(q, k, v)  # reads the target's cache, writes the stream slots
        elif num_main == 0:
            o = rows.attend(attn.attn, q)  # query-only: reads main keys <= the anchor
        else:  # fused: the main rows write this step's keys, then the stream rows read
            o = torch.cat([attn.attn(q[:num_main], k[:num_main], v[:num_main]),
                           rows.attend(attn.attn, q[num_main:])])
        return self._stream_linear(li, "o", p.o_proj, o, num_main)

    def _rotary(self, attn: nn.Module, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.rotary_emb(positions, q, k)

    def _stream_mlp(self, li: int, p: LayerParts, h: torch.Tensor,
                    num_main: int = 0) -> torch.Tensor:
        a = p.act(self._stream_linear(li, "mlp_in", p.mlp_in, h, num_main))
        return self._stream_linear(li, "mlp_out", p.mlp_out, a, num_main)

    def _stream_layer(self, li: int, positions: torch.Tensor, hidden: torch.Tensor,
                      residual: torch.Tensor | None, num_main: int = 0):
        """Layer ``li`` for stream rows; in the fused pass the first ``num_main`` rows are
        the verification forward's own, computed by the same modules as vLLM's layer."""
        p = self._parts(li)
        norm1, norm2 = p.norms if num_main else p.pass_norms
        if self.layout.residual == "fused":  # vLLM's add-RMSNorm: residual carried beside
            if residual is None:
                residual = hidden
                h = norm1(hidden)
            else:
                h, residual = norm1(hidden, residual)
            out = self._stream_attention(li, p, positions, h, num_main)
            h, residual = norm2(out, residual)
            return self._stream_mlp(li, p, h, num_main), residual
        if self.layout.residual == "parallel":
            h = norm1(hidden)
            out = self._stream_attention(li, p, positions, h, num_main) + \
                self._stream_mlp(li, p, h, num_main)
            return out + hidden, None
        hidden = hidden + self._stream_attention(li, p, positions, norm1(hidden), num_main)
        return hidden + self._stream_mlp(li, p, norm2(hidden), num_main), None

    def stream_draft(self, h_rows: torch.Tensor, next_rows: torch.Tensor | None,
                     stream_idx: torch.Tensor, positions: torch.Tensor):
        """Stream rows (:meth:`stream_row_inputs`) through the top N_s layers and the draft
        head: (top-1 ids, their probabilities in float32) per row, or None on a rank that
        does not receive the gathered logits.

        Must be called where the attention can find the stream rows' metadata: inside a
        forward context that describes them, or, with a direct attention path
        (``stream_attend``), after the proposer bound it there. Inputs, layers and head are one compiled call (dynamic shapes) where
        the draft head is local to the rank: after the verification forward has streamed
        the model's weights through the caches, every separate eager operation of a pass
        starts cold, and the pass's few rows make those operations most of its time beside
        the weights. Eager when the engine is (``enforce_eager``) or
        ``SPECSTREAM_COMPILE_DRAFT=0``; if compilation fails the pass runs eagerly for good
        (rerunning it rewrites the same cache slots)."""
        local = self.local_draft_head()
        head, bias = local if local is not None else (None, None)
        args = (h_rows, next_rows, stream_idx, positions, head, bias)
        out = None
        if self._compiled_stream_draft is not None:
            try:
                out = self._compiled_stream_draft(*args)
            except Exception as exc:  # noqa: BLE001 - a compiler problem must not stop serving
                logger.warning("specstream: compiled stream pass failed (%s: %s); running it "
                               "eagerly from now on", type(exc).__name__, exc)
                self._compiled_stream_draft = None
        if out is None:
            out = self._stream_draft(*args)
        return out if local is not None else self.draft_token_ids(out)

    def _stream_draft(self, h_rows, next_rows, stream_idx, positions, head, bias):
        """(ids, probabilities) through a local draft head; without one (``head`` None)
        the final-normed hidden states, for the gathered full head."""
        hidden = self._stream_forward(self.stream_row_inputs(h_rows, next_rows, stream_idx),
                                      positions)
        if head is None:
            return hidden
        return draft_top1(hidden, head, bias, self.stream_draft_vocab)

    def _stream_forward(self, stream_inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        s = self.stream_settings
        hidden, residual = stream_inputs, None
        for li in range(s.first_layer, s.num_layers):
            hidden, residual = self._stream_layer(li, positions, hidden, residual)
        return self._final_norm(hidden, residual)

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if not self._layer_parts:
            self._resolve_layer_parts()
        norm = self._final_norms[1]
        if self.layout.residual == "fused":
            hidden, _ = norm(hidden, residual)
            return hidden
        return hidden if norm is None else norm(hidden)

    # ---- query-only stream rows (anchor form) ----
    def query_only_forward(self, stream_inputs: torch.Tensor, rows: StreamRows) -> torch.Tensor:
        """The separate pass of the anchor form: ``rows`` through the top N_s layers, each
        row attending to its anchor's main keys only, nothing written; final-normed.
        Eager, and the same operations as the stream rows of the fused pass (a zero
        residual beside them where the layout carries one), so both drafts agree."""
        s = self.stream_settings
        hidden, residual = stream_inputs, self._stream_residual(stream_inputs)
        self.stream_rows = rows
        try:
            for li in range(s.first_layer, s.num_layers):
                hidden, residual = self._stream_layer(li, rows.positions, hidden, residual)
        finally:
            self.stream_rows = None
        return self._final_norm(hidden, residual)

    def _stream_residual(self, x: torch.Tensor) -> torch.Tensor | None:
        """The residual beside stream rows entering layer L-N_s: zero where the main rows
        carry one there (vLLM's add-RMSNorm below the first layer), else none."""
        if self.layout.residual == "fused" and self.stream_settings.first_layer > 0:
            return torch.zeros_like(x)
        return None

    def _ride_top_layers(self) -> None:
        """The fused pass's hook: each top layer's forward takes the stream rows along while
        ``stream_rows`` holds a fused batch (set by the proposer before the verification
        forward); otherwise it is vLLM's own. Layers are called as vLLM's Llama-family
        decoder calls them, ``layer(positions, hidden, residual)``."""
        if not self.layout.eagle_aux:
            raise ValueError(f"draft_pass fused is not supported by {type(self).__name__}; "
                             "use \"draft_pass\": \"separate\"")
        s = self.stream_settings
        for li in range(s.first_layer, s.num_layers):
            layer = self.stream_layers()[li]
            layer.forward = self._riding_forward(li, layer.forward)

    def _riding_forward(self, li: int, own_forward):
        def forward(positions, hidden_states, residual, **kwargs):
            rows = self.stream_rows
            if rows is None or not rows.fused:
                return own_forward(positions, hidden_states, residual, **kwargs)
            if li == self.stream_settings.first_layer:
                hidden_states, residual = self._join_stream_rows(rows, positions, hidden_states,
                                                                 residual)
            return self._stream_layer(li, rows.joined_positions, hidden_states, residual,
                                      rows.num_main)
        return forward

    def _join_stream_rows(self, rows: StreamRows, positions: torch.Tensor,
                          hidden: torch.Tensor, residual: torch.Tensor | None):
        """Main rows entering layer L-N_s, then the stream rows ``h_t + e_j`` of every
        anchor (h_t: the main row's input of that layer, as the aux output computes it)."""
        rows.num_main = n = hidden.shape[0]
        h = hidden if residual is None else hidden + residual
        x = self.stream_inputs(h[rows.anchor_tokens], None, rows.num_streams)
        rows.joined_positions = torch.cat([positions[:n], rows.positions.to(positions.dtype)])
        if residual is not None:
            residual = torch.cat([residual, torch.zeros_like(x)])
        return torch.cat([hidden, x]), residual

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        """vLLM's forward; with a fused batch of stream rows set, run eagerly (the rows are
        not part of the compiled graph), the rows' final hidden states kept in the batch
        and only the main rows returned."""
        args = (input_ids, positions, intermediate_tensors, inputs_embeds)
        rows = self.stream_rows
        if rows is None or not rows.fused:
            return super().forward(*args, **kwargs)
        from vllm.forward_context import get_forward_context
        ctx = get_forward_context()
        compiled = ctx.skip_compiled
        ctx.skip_compiled = True
        try:
            hidden, aux = super().forward(*args, **kwargs)
        finally:
            ctx.skip_compiled = compiled
            self.stream_rows = None
        n = rows.num_main
        rows.hidden = hidden[n:]
        return hidden[:n], aux

    def stream_attention_modules(self) -> dict[int, nn.Module]:
        """Layer index -> vLLM ``Attention`` module of each stream layer."""
        s, L = self.stream_settings, self.layout
        layers = self.stream_layers()
        return {i: get(layers[i], L.attn).attn for i in range(s.first_layer, s.num_layers)}

    def stream_attention_layer_names(self) -> list[str]:
        return [a.layer_name for a in self.stream_attention_modules().values()]


@contextmanager
def _built_as(subclass: type):
    """While the vLLM model builds itself, its module-level name for the decoder class
    (``GPT2Model``, ``OPTDecoder``, ...) means ``subclass``: the decoder is created as the
    aux-output subclass, so vLLM's torch.compile wrapper (which binds ``self.forward``
    in ``__init__``) compiles that forward."""
    base = subclass.__bases__[0]
    module = sys.modules[base.__module__]
    if getattr(module, base.__name__) is not base:
        raise RuntimeError(f"{module.__name__}.{base.__name__} is not vLLM's own class")
    setattr(module, base.__name__, subclass)
    try:
        yield
    finally:
        setattr(module, base.__name__, base)


def _out(y):
    """A vLLM linear's output: ``(out, bias)`` from native models, the tensor alone from
    the Transformers backend's (``return_bias=False``)."""
    return y[0] if isinstance(y, tuple) else y


def _row_parallel(linear, r: int, scaling: float, rank: int) -> ShardedLoRA:
    n = linear.input_size_per_partition
    return ShardedLoRA(r, scaling, linear.input_size, in_slice=(rank * n, (rank + 1) * n),
                       full_out=linear.output_size)


def layers_with_aux(decoder, layout: Layout, hidden: torch.Tensor,
                    call_layer: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    """The rest of a decoder forward after its input embedding (single pipeline stage),
    also returning the hidden state entering layer ``decoder.stream_first_layer``: the
    same modules in the same order as vLLM's own forward, so the main output's numerics
    do not change."""
    aux = []
    for i, layer in enumerate(get(decoder, layout.layers)):
        if i == decoder.stream_first_layer:
            aux.append(hidden)
        hidden = call_layer(layer, hidden)
    norm = get(decoder, layout.final_norm)
    if norm is not None:
        hidden = norm(hidden)
    return hidden, aux
