"""The ``specstream`` drafter: one pass of the target's own top N_s layers.

After verification, for every request with a new token, the anchor t is its last
accepted position. Stream j gets ``h_t + e_j`` (h_t: the aux hidden state entering
layer L-N_s, produced by the verification forward itself) at rotary position t+j,
and is written to the target's KV cache at slot t+j. With the usual causal
attention over that cache, stream j then sees main positions <= t and streams
1..j -- exactly the contract of DESIGN.md. The top-1 of each stream is the draft.
The next verification overwrites the stream slots, as it does for EAGLE.
"""
from __future__ import annotations

import json
import os

import torch

from . import compat

#: set SPECSTREAM_DRAFT_LOG=path to append every draft with its context (tests only)
_DRAFT_LOG = os.environ.get("SPECSTREAM_DRAFT_LOG")
_PROFILE = bool(os.environ.get("SPECSTREAM_PROFILE"))


class SpecStreamProposer:
    def __init__(self, vllm_config, device: torch.device, runner):
        self.vllm_config = vllm_config
        self.device = device
        self.runner = runner
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.model = None
        self.min_draft_prob = 0.0
        self._layer_names: list[str] = []
        self._groups = None
        self._kv_gid = 0
        self._stream_offsets = torch.arange(1, self.num_speculative_tokens + 1, dtype=torch.int64)

    # vLLM calls this from the runner's load_model with the target model
    def load_model(self, target_model) -> None:
        model = target_model
        while not hasattr(model, "stream_forward") and hasattr(model, "model") and model.model is not model:
            model = getattr(model, "model")
        if not hasattr(model, "stream_forward"):
            raise RuntimeError("the served model is not a SpecStream MSA model; was the "
                               "specstream plugin loaded in this worker?")
        self.model = model
        self.min_draft_prob = model.stream_settings.min_draft_prob
        self._layer_names = model.stream_attention_layer_names()

    def _ensure_groups(self) -> None:
        if self._groups is None:
            self._kv_gid, self._groups = compat.attention_groups_for(self.runner, self._layer_names)
            self._block_size = compat.runner_block_size(self.runner, self._kv_gid)

    def propose(self, **kwargs) -> torch.Tensor:
        if _PROFILE:
            from .profiling import timer
            with timer("worker").span("draft"):
                return self._propose(**kwargs)
        return self._propose(**kwargs)

    @torch.inference_mode()
    def _propose(self, *, sampled_token_ids, aux_hidden_states, spec_decode_metadata,
                common_attn_metadata, num_speculative_tokens: int | None = None) -> torch.Tensor:
        self._ensure_groups()
        cm = common_attn_metadata
        g = min(num_speculative_tokens or self.num_speculative_tokens, self.num_speculative_tokens)
        num_reqs = cm.num_reqs
        out = torch.zeros(num_reqs, self.num_speculative_tokens, dtype=torch.int64, device=self.device)
        if g <= 0 or num_reqs == 0:
            return out
        n_sampled = torch.tensor([len(t) for t in sampled_token_ids], dtype=torch.int64)
        if spec_decode_metadata is not None:
            n_draft = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.int64)
        else:
            n_draft = torch.zeros(num_reqs, dtype=torch.int64)
        active = torch.nonzero(n_sampled[:num_reqs] > 0).flatten()
        if active.numel() == 0:
            return out
        # rejected tokens of each request: the anchor sits that many tokens before the end
        rejected = (n_draft[:num_reqs] - (n_sampled[:num_reqs] - 1)).clamp(min=0)
        qsl = cm.query_start_loc_cpu[: num_reqs + 1].to(torch.int64)
        seq_lens = cm.seq_lens.to("cpu", torch.int64)[:num_reqs]
        anchor_tok = (qsl[1:] - 1 - rejected)[active]
        anchor_pos = (seq_lens - 1 - rejected)[active]
        R = active.numel()
        h = aux_hidden_states[0][anchor_tok.to(self.device)]  # [R, d]
        # x_{t+1}: the token just sampled at the anchor (next-token-aware streams read it)
        next_ids = torch.tensor([sampled_token_ids[i][-1] for i in active.tolist()],
                                dtype=torch.int64, device=self.device)
        x = self.model.stream_inputs(h, next_ids, g)
        pos = (anchor_pos[:, None] + self._stream_offsets[:g]).reshape(-1)
        block_table = cm.block_table_tensor[active.to(cm.block_table_tensor.device)]
        bs = self._block_size
        req_rows = torch.arange(R).repeat_interleave(g)
        blocks = block_table.to("cpu")[req_rows, pos // bs].to(torch.int64)
        slots = blocks * bs + pos % bs
        draft_cm = compat.draft_attention_metadata(
            cm,
            query_start_loc_cpu=torch.arange(R + 1, dtype=torch.int32) * g,
            seq_lens_cpu=(anchor_pos + 1 + g).to(torch.int32),
            positions=pos.to(self.device),
            slot_mapping=slots.to(self.device),
            block_table=block_table,
            query_len=g,
            device=self.device,
        )
        per_layer = compat.build_layer_metadata(self._groups, draft_cm)
        positions = pos.to(self.device)
        with compat.forward_context(per_layer, self.vllm_config, R * g, draft_cm.slot_mapping,
                                    self._layer_names):
            hidden = self.model.stream_forward(x, positions)
        res = self.model.draft_token_ids(hidden)
        if res is None:  # a rank without gathered logits; the driver rank's drafts are used
            return out
        ids, prob = res
        out[active.to(self.device), :g] = ids.view(R, g)
        if _DRAFT_LOG:
            self._log_drafts(active, anchor_pos, out, next_ids)
        if self.min_draft_prob <= 0.0:
            return out
        return self._cut_low_confidence(out, active, prob.view(R, g), num_reqs, g)

    def _cut_low_confidence(self, out: torch.Tensor, active: torch.Tensor, prob: torch.Tensor,
                            num_reqs: int, g: int) -> list[list[int]]:
        """Per request, keep the chain up to the first stream below ``min_draft_prob``.

        Returned as lists (vLLM's variable-length draft path, as for ngram); requests
        without a new token get no draft."""
        keep = (prob >= self.min_draft_prob).to(torch.int64).cumprod(dim=1).sum(dim=1).tolist()
        rows = out[:, :g].tolist()
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        for r, n in zip(active.tolist(), keep):
            drafts[r] = rows[r][:n]
        return drafts

    def _log_drafts(self, active, anchor_pos, out, next_ids) -> None:
        """Debug/test hook: record (context up to the anchor, the token sampled there,
        drafts) so tests can replay the reference."""
        tokens = self.runner.input_batch.token_ids_cpu
        with open(_DRAFT_LOG, "a") as f:
            for i, t, nxt in zip(active.tolist(), anchor_pos.tolist(), next_ids.tolist()):
                f.write(json.dumps({"context": tokens[i, : t + 1].tolist(), "next_token": nxt,
                                    "drafts": out[i].tolist()}) + "\n")

    # The runner may call these for model-based drafters; streams need nothing extra.
    def dummy_run(self, *args, **kwargs) -> None:
        return None
