"""The ``specstream`` drafter: one pass of the target's own top N_s layers.

After verification, for every request with a new token, the anchor t is its last
accepted position. Stream j gets ``h_t + e_j`` (h_t: the aux hidden state entering
layer L-N_s, produced by the verification forward itself) at rotary position t+j,
and is written to the target's KV cache at slot t+j. With the usual causal
attention over that cache, stream j then sees main positions <= t and streams
1..j -- exactly the contract of DESIGN.md. The top-1 of each stream is the draft.
The next verification overwrites the stream slots, as it does for EAGLE.

How many of the drafts each request proposes is the draft policy's choice
(draft_policy.py, ``"draft_policy": "auto" | "fixed"``): the proposer feeds it the
measured step times (from compat's step clock), each stream's top-1 probability and
the acceptance of the previous step's drafts, and asks it whether to run the stream
pass at all and how long each request's chain is.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch

from . import compat
from .draft_policy import DraftPolicy, PolicyConfig

logger = logging.getLogger("vllm.specstream")

#: set SPECSTREAM_DRAFT_LOG=path to append every draft with its context (tests only)
_DRAFT_LOG = os.environ.get("SPECSTREAM_DRAFT_LOG")
_PROFILE = bool(os.environ.get("SPECSTREAM_PROFILE"))
#: set SPECSTREAM_POLICY_DUMP=path to write the policy's state (counters, cost fit,
#: calibration table) as JSON every 10 steps (tests, benchmarks)
_POLICY_DUMP = os.environ.get("SPECSTREAM_POLICY_DUMP")
_LOG_EVERY_S = 30.0
#: set SPECSTREAM_POLICY_TRACE=path to append one JSON line per decision (debugging)
_POLICY_TRACE = os.environ.get("SPECSTREAM_POLICY_TRACE")


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
        self.policy: DraftPolicy | None = None
        self._policy_settings = compat.policy_settings(vllm_config)
        # req_id -> raw stream probabilities of the drafts it proposed last step
        self._pending: dict[str, list[float]] = {}
        self._last_log = time.monotonic()

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
        st = model.stream_settings
        ps = self._policy_settings
        self.policy = DraftPolicy(PolicyConfig(
            gamma=self.num_speculative_tokens, mode=ps.get("mode", "auto"),
            min_draft_prob=self.min_draft_prob,
            draft_layer_fraction=st.num_stream_layers / max(st.num_layers, 1),
            cost_scale=ps.get("cost_scale", 1.0), force_off_steps=ps.get("force_off_steps", 0),
            force_off_from=ps.get("force_off_from", 0)))
        logger.info("specstream: draft policy %s (gamma %d)", self.policy.cfg.mode,
                    self.num_speculative_tokens)

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
                 common_attn_metadata, num_speculative_tokens: int | None = None):
        cm = common_attn_metadata
        g = min(num_speculative_tokens or self.num_speculative_tokens, self.num_speculative_tokens)
        num_reqs = cm.num_reqs
        no_drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        n_sampled = torch.tensor([len(t) for t in sampled_token_ids], dtype=torch.int64)
        if spec_decode_metadata is not None:
            n_draft = torch.tensor(spec_decode_metadata.num_draft_tokens, dtype=torch.int64)
        else:
            n_draft = torch.zeros(num_reqs, dtype=torch.int64)
        self._observe(num_reqs, n_sampled, n_draft)
        if g <= 0 or num_reqs == 0:
            return no_drafts
        active = torch.nonzero(n_sampled[:num_reqs] > 0).flatten()
        if active.numel() == 0:
            return no_drafts
        plan = self.policy.plan(active.numel())
        run, depth = compat.tp_agree([int(plan.run_pass), min(plan.depth, g)])
        if not run or depth <= 0:
            self._trace(active.numel(), 0, [])
            self._maybe_report()
            return no_drafts
        t0 = time.perf_counter()
        res = self._stream_pass(cm, active, sampled_token_ids, aux_hidden_states, n_sampled,
                                n_draft, depth)
        clock = compat.step_clock(self.runner)
        if res is None:  # a rank without gathered logits; the driver rank's drafts are used
            return no_drafts
        ids, prob = res
        lengths = self.policy.choose(prob, active.numel()).tolist()
        if clock is not None and clock.current is not None:
            clock.current.draft_seconds = time.perf_counter() - t0
            clock.current.draft_stream_tokens = int(active.numel()) * depth
        rows, probs = ids.tolist(), prob.tolist()
        req_ids = compat.runner_req_ids(self.runner)
        drafts = no_drafts
        for k, (r, n) in enumerate(zip(active.tolist(), lengths)):
            if n:
                drafts[r] = rows[k][:n]
                self._pending[req_ids[r]] = probs[k][:n]
        self._trace(active.numel(), depth, lengths)
        self._maybe_report()
        return drafts

    def _trace(self, reqs: int, depth: int, lengths: list[int]) -> None:
        if not _POLICY_TRACE:
            return
        p = self.policy
        rec = {"step": p.stats.steps, "reqs": reqs, "depth": depth, "drafts": sum(lengths),
               "verify_w": p.verify.weights().tolist() if p.verify.ready else None,
               "draft_w": p.draft.weights().tolist() if p.draft.ready else None,
               "profile": [None if x != x else round(x, 3) for x in p.profile.tolist()]}
        with open(_POLICY_TRACE, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _observe(self, num_reqs: int, n_sampled: torch.Tensor, n_draft: torch.Tensor) -> None:
        """Feed the policy last step's cost and its drafts' fate."""
        clock = compat.step_clock(self.runner)
        rec = clock.take_finished() if clock is not None else None
        if rec is not None:
            self.policy.observe_step(rec.num_tokens, rec.num_draft_tokens, rec.period,
                                     rec.draft_seconds, rec.draft_stream_tokens)
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        req_ids = compat.runner_req_ids(self.runner)
        g = self.num_speculative_tokens
        probs, drafted, accepted = [], [], []
        for i in range(min(num_reqs, len(req_ids))):
            p = pending.get(req_ids[i])
            d = int(n_draft[i]) if i < n_draft.numel() else 0
            if p is None or d == 0 or i >= n_sampled.numel() or int(n_sampled[i]) == 0:
                continue
            probs.append(p + [0.0] * (g - len(p)))
            drafted.append(min(d, len(p)))
            accepted.append(int(n_sampled[i]) - 1)
        if probs:
            self.policy.observe_acceptance(torch.tensor(probs, dtype=torch.float32),
                                           torch.tensor(drafted), torch.tensor(accepted))

    def _stream_pass(self, cm, active, sampled_token_ids, aux_hidden_states, n_sampled, n_draft,
                     g: int):
        """Streams 1..g of every active request: (draft ids [R, g], probabilities [R, g])."""
        self._ensure_groups()
        num_reqs = cm.num_reqs
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
        if res is None:
            return None
        ids, prob = res
        ids, prob = ids.view(R, g).to("cpu"), prob.view(R, g).to("cpu", torch.float32)
        if _DRAFT_LOG:
            self._log_drafts(active, anchor_pos, ids, next_ids)
        return ids, prob

    def _maybe_report(self, force: bool = False) -> None:
        p = self.policy
        if _POLICY_DUMP and (force or p.stats.steps % 10 == 0):
            tmp = f"{_POLICY_DUMP}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(p.summary(), f)
            os.replace(tmp, _POLICY_DUMP)
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            s = p.stats.as_dict()
            cal = ", ".join(f"{c['observed']:.2f}/{c['predicted']:.2f}" for c in p.calib.per_position()
                            if c["n"])
            logger.info("specstream draft policy (%s): %d steps, %d without speculation, "
                        "%.2f draft tokens per step (%.2f per request), probes %d; "
                        "acceptance observed/predicted per position: %s", p.cfg.mode, s["steps"],
                        s["steps_without_speculation"], s["mean_draft_tokens_per_step"],
                        s["mean_draft_tokens_per_request_step"], s["probes"], cal or "-")

    def _log_drafts(self, active, anchor_pos, out, next_ids) -> None:
        """Debug/test hook: record (context up to the anchor, the token sampled there,
        the streams' drafts -- as many as the pass ran) so tests can replay the reference."""
        tokens = self.runner.input_batch.token_ids_cpu
        with open(_DRAFT_LOG, "a") as f:
            for k, (i, t, nxt) in enumerate(zip(active.tolist(), anchor_pos.tolist(),
                                                  next_ids.tolist())):
                f.write(json.dumps({"context": tokens[i, : t + 1].tolist(), "next_token": nxt,
                                    "drafts": out[k].tolist()}) + "\n")

    # The runner may call these for model-based drafters; streams need nothing extra.
    def dummy_run(self, *args, **kwargs) -> None:
        return None
