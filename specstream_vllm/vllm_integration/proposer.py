"""The ``specstream`` drafter: one pass of the target's own top N_s layers.

After verification, for every request with a new token, the anchor t is its last
accepted position. Stream j gets ``h_t + e_j`` (h_t: the aux hidden state entering
layer L-N_s, produced by the verification forward itself) at rotary position t+j,
and is written to the target's KV cache at slot t+j. With the usual causal
attention over that cache, stream j then sees main positions <= t and streams
1..j -- exactly the contract of DESIGN.md. The top-1 of each stream is the draft.
The next verification overwrites the stream slots, as it does for EAGLE.

How many of the drafts each request proposes is the draft policy's choice
(specstream_vllm/policy, ``"draft_policy": "auto" | "fixed"``): the proposer feeds it the
measured step times (from the runner's step clock, step_clock.py), each stream's top-1 probability and
the acceptance of the previous step's drafts, and asks it whether to run the stream
pass at all and how long each request's chain is.

A match source (match_source.py, ``"match": "suffix" | "ngram" | "none"``) drafts from
the request's own text beside the streams: its drafts are found first (cheap, CPU), the
policy sees them as candidates when it plans the stream pass and when it chooses, and
each request proposes one of the two drafts. The two modules know nothing of each other;
the proposer composes them and counts, per source, the drafts taken and their accepted
tokens (log line, policy dump; the runner patch carries the per-request source to the
scheduler for ``/metrics``).

Streams of the ``anchor`` form attend to the main keys <= t only and write nothing
(anchor_rows.py). They run after verification like the others (``draft_pass:
separate``), or ride inside the verification forward itself (``fused``: the runner patch
wraps the target's forward in :meth:`SpecStreamProposer.riding`, which hands the model
rows for every potential anchor; after rejection sampling the accepted anchors' rows
are taken, with no second pass over the layers).

On an accelerator the drafts never visit the host inside the proposer
(device_drafts.py): the proposer returns them as a device tensor, as vLLM's EAGLE
proposer does, cut per request on the device from the statistics of past steps
(policy/device_cut.py); vLLM's own copy of the drafts brings them, and the probabilities
beside them, to the host. On a CPU there is no device to wait for, and the host path
chooses each request's drafts from this step's probabilities.

The runner's state is read only through :class:`~.runner_view.RunnerView`; attention
metadata for the stream tokens is built in draft_attention.py; the log line, policy dump
and draft log are proposer_report.py.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from .. import envs
from . import proposer_report as report
from . import cpu_stream_attention, state_sizes, vllm_ops
from .draft_attention import draft_common_metadata, forward_context, host_seq_lens, layer_metadata
from ..policy import STREAMS, Candidates, DraftPolicy, PassChooser, PolicyConfig
from .anchor_rows import AnchorRows
from .device_drafts import DevicePath
from .match_source import make_match_source
from .runner_view import RunnerView
from .sync_audit import SyncAudit, host_numpy

logger = logging.getLogger("vllm.specstream")


def policy_settings(vllm_config) -> dict:
    """The draft policy's settings the config patch stored in the served hf config."""
    hf = vllm_config.model_config.hf_config
    return dict(getattr(hf, "specstream_policy", None) or {})


class SpecStreamProposer:
    def __init__(self, vllm_config, device: torch.device, runner):
        self.vllm_config = vllm_config
        self.device = device
        self.runner = RunnerView(runner)
        # debugging / measurement switches, read once per engine (envs.py)
        #: file: append every draft with its context (tests)
        self._draft_log = envs.get("SPECSTREAM_DRAFT_LOG")
        self._profile = envs.is_set("SPECSTREAM_PROFILE")
        self._raise_errors = envs.get("SPECSTREAM_RAISE_ERRORS")
        #: file: the policy's state (counters, cost fit, calibration) as JSON every 10 steps
        self._policy_dump = envs.get("SPECSTREAM_POLICY_DUMP")
        #: file: one JSON line per decision
        self._policy_trace = envs.get("SPECSTREAM_POLICY_TRACE")
        audit = envs.get("SPECSTREAM_SYNC_AUDIT")
        self._audit = SyncAudit(audit) if audit else None
        # vLLM's k: the longest draft of any source (streams: at most their own gamma)
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.num_streams = self.num_speculative_tokens
        self.model = None
        self.min_draft_prob = 0.0
        self._layer_names: list[str] = []
        self._groups = None
        self._kv_gid = 0
        self._anchor_rows: AnchorRows | None = None
        self.draft_pass = "separate"
        self.passes: PassChooser | None = None     # draft_pass auto: per batch-size bucket
        #: stream drafting steps per pass (policy dump: tests check which pass ran)
        self.pass_counts = {"fused": 0, "separate": 0}
        #: drafts as a device tensor, cut on the device (accelerators; None: the host path)
        self.device_path: DevicePath | None = None
        self.policy: DraftPolicy | None = None
        self._policy_settings = policy_settings(vllm_config)
        match = dict(self._policy_settings.get("match") or {})
        self.match = make_match_source(match, vllm_ops.ngram_kernel)
        self.match_tokens = min(int(match.get("max_tokens", self.num_speculative_tokens)),
                                self.num_speculative_tokens)
        # req_id -> (source, raw probabilities / confidences of the drafts it proposed last step)
        self._pending: dict[str, tuple[str, list[float]]] = {}
        # per source: [drafts taken, draft tokens, accepted tokens] (worker-side view)
        self.source_counts: dict[str, list[int]] = {STREAMS: [0, 0, 0]}
        if self.match is not None:
            self.source_counts[self.match.name] = [0, 0, 0]
        #: row -> source of the drafts returned by the last propose() (read by the runner patch)
        self.last_sources: list[str | None] = []
        self._last_log = time.monotonic()
        self.errors = 0         # propose() calls that failed and ran without drafts
        self._last_period: float | None = None     # the last finished step's seconds (trace)

    # vLLM calls this from the runner's load_model with the target model
    def load_model(self, target_model) -> None:
        model = target_model
        while not hasattr(model, "stream_draft") and hasattr(model, "model") and model.model is not model:
            model = getattr(model, "model")
        if not hasattr(model, "stream_draft"):
            raise RuntimeError("the served model is not a SpecStream MSA model; was the "
                               "specstream plugin loaded in this worker?")
        self.model = model
        self.min_draft_prob = model.stream_settings.min_draft_prob
        self._layer_names = model.stream_attention_layer_names()
        st = model.stream_settings
        self.num_streams = min(st.num_streams, self.num_speculative_tokens)
        self.draft_pass = st.draft_pass if st.query_only else "separate"
        self.passes = PassChooser() if self.draft_pass == "auto" else None
        ps = self._policy_settings
        self.policy = DraftPolicy(PolicyConfig(
            gamma=self.num_streams, mode=ps.get("mode", "auto"),
            min_draft_prob=self.min_draft_prob, sequential=st.chain,
            draft_layer_fraction=st.num_stream_layers / max(st.num_layers, 1),
            cost_scale=ps.get("cost_scale", 1.0), force_off_steps=ps.get("force_off_steps", 0),
            force_off_from=ps.get("force_off_from", 0),
            realized_guard=ps.get("realized_guard", True),
            match_budget=ps.get("match_budget", True), streams=ps.get("streams", True)))
        # chain streams decide between their passes from each pass's drafts: host only
        on_device = torch.device(self.device).type != "cpu" or envs.get("SPECSTREAM_DEVICE_DRAFTS")
        if on_device and not st.chain:
            self.device_path = DevicePath(self, self.vllm_config.scheduler_config.max_num_seqs)
        logger.info("specstream: draft policy %s (gamma %d), match source %s (up to %d tokens), "
                    "drafts cut on the %s", self.policy.cfg.mode, self.num_streams,
                    self.match.name if self.match else "none", self.match_tokens,
                    "device" if self.device_path is not None else "host")

    def _ensure_groups(self) -> None:
        if self._groups is None:
            self._kv_gid, self._groups = self.runner.attention_groups(self._layer_names)
            self._block_size = self.runner.block_size(self._kv_gid)
            if self.model.stream_settings.query_only:
                self._anchor_rows = AnchorRows(self._groups, self.device, self.num_streams)
            self.model.stream_attend = cpu_stream_attention.stream_attention_for(
                self.model.stream_attention_modules())
            logger.info("specstream: the stream pass attends through %s",
                        "vLLM-CPU's attention kernels, called directly"
                        if self.model.stream_attend is not None else "vLLM's Attention layers")

    def _counting(self):
        return self._audit.counting() if self._audit is not None else nullcontext()

    @contextmanager
    def riding(self, scheduler_output, common_attn_metadata):
        """Around the verification forward (runner patch): with the fused pass, the model
        gets query-only stream rows for every potential anchor of this step."""
        with self._counting():
            self.model.stream_rows = self._fused_rows(scheduler_output, common_attn_metadata)
        try:
            yield
        finally:
            self.model.stream_rows = None

    def _fused_rows(self, scheduler_output, common_attn_metadata):
        draft_pass = self.draft_pass
        if draft_pass == "auto" and common_attn_metadata is not None:
            # each rank measures its own steps: rank 0's choice, or the collectives differ
            draft_pass = self.passes.choose(common_attn_metadata.num_reqs)
            draft_pass = "fused" if vllm_ops.tp_agree([int(draft_pass == "fused")])[0] else "separate"
            clock = self.runner.step_clock()
            if clock is not None and clock.current is not None:
                clock.current.draft_pass = draft_pass
        if draft_pass != "fused" and self._anchor_rows is not None:
            self._anchor_rows.forget()
        if draft_pass != "fused" or common_attn_metadata is None:
            return None
        try:
            self._ensure_groups()
            return self._anchor_rows.fused(common_attn_metadata, scheduler_output, self.runner)
        except Exception:
            if self._raise_errors or vllm_ops.tp_world_size() > 1:
                raise
            self.errors += 1
            logger.exception("specstream: preparing the fused stream rows failed; this "
                             "step's drafts run as a separate pass")
            self._anchor_rows.forget()
            return None

    def propose(self, **kwargs):
        """This step's drafts: a device tensor ``[num_reqs, width]`` (-1 past a request's
        drafts; the scheduler patch drops those) on the device path, else per-request lists."""
        try:
            with self._counting():
                if self._profile:
                    from .profiling import timer
                    with timer("worker").span("draft"):
                        out = self._propose(**kwargs)
                else:
                    out = self._propose(**kwargs)
            if self._audit is not None:
                self._audit.step_done("device" if self.device_path is not None else "host",
                                      kwargs["common_attn_metadata"].num_reqs)
            return out
        except Exception:
            # A drafting bug must cost speedup, not the server: without tensor parallelism
            # (no collective to fall out of step with) the step goes on without drafts, which
            # verification makes exact. SPECSTREAM_RAISE_ERRORS=1 (the tests) re-raises.
            if self._raise_errors or vllm_ops.tp_world_size() > 1:
                raise
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                logger.exception("specstream: drafting failed (%d times so far); this step "
                                 "runs without drafts", self.errors)
            self._pending.clear()
            if self.device_path is not None:
                self.device_path.forget()
            n = kwargs["common_attn_metadata"].num_reqs
            self.last_sources = [None] * n
            return [[] for _ in range(n)]

    @torch.inference_mode()
    def _propose(self, *, sampled_token_ids, aux_hidden_states, spec_decode_metadata,
                 common_attn_metadata, num_speculative_tokens: int | None = None):
        state_sizes.maybe_log(self)  # SPECSTREAM_STATE_LOG: structure sizes for long runs
        cm = common_attn_metadata
        k = min(num_speculative_tokens or self.num_speculative_tokens, self.num_speculative_tokens)
        num_reqs = cm.num_reqs
        self.last_sources = [None] * num_reqs
        # host numbers vLLM already holds: tokens sampled per request, drafts it verified
        n_sampled = [len(t) for t in sampled_token_ids[:num_reqs]]
        n_draft = (list(spec_decode_metadata.num_draft_tokens) if spec_decode_metadata is not None
                   else [0] * num_reqs)
        if self.device_path is not None:
            self.device_path.settle()       # last step's probabilities, now on the host
        self._observe(num_reqs, n_sampled, n_draft)
        if self.match is not None:
            self.match.drop_departed(self.runner.req_ids()[:num_reqs])
        no_drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        rows = [i for i, n in enumerate(n_sampled) if n > 0]
        if k <= 0 or not rows:
            return no_drafts
        R = len(rows)
        matches = cands = cand_chain = None
        if self.match is not None and self.policy.match_due(R):
            t0 = time.perf_counter()
            view = self.runner.token_view(num_reqs)
            self.match.sync(view)           # new tokens in (since the last lookup), departed out
            matches = self.match.propose(view, rows, min(k, self.match_tokens))
            if any(m is not None for m in matches):
                cands = self._candidates(matches)
                cand_chain = cands.chain = self.policy.expected(cands)
            self.policy.observe_lookup(R, time.perf_counter() - t0)
        plan = self.policy.plan(R, cand_chain)
        if not plan.use_candidates:
            cands = None        # none can pay this step: the streams-only decision
        g = min(k, self.num_streams)
        run, depth, limit = vllm_ops.tp_agree([int(plan.run_pass), min(plan.depth, g), plan.rows])
        if run and 0 < limit < len(rows):      # a probe: a few requests suffice
            rows, cands, matches = rows[:limit], None, None
        step = dict(cm=cm, rows=rows, reqs=R, sampled_token_ids=sampled_token_ids,
                    aux_hidden_states=aux_hidden_states, n_sampled=n_sampled, n_draft=n_draft,
                    depth=depth if run else 0, cands=cands, matches=matches)
        if self.device_path is not None:
            return self.device_path.propose(**step)
        return self._host_choice(**step)

    def _host_choice(self, *, cm, rows, reqs, sampled_token_ids, aux_hidden_states, n_sampled,
                     n_draft, depth, cands, matches):
        """The host path: this step's probabilities to the host, the policy chooses."""
        num_reqs = cm.num_reqs
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        ids = prob = anchor_pos = None
        if depth > 0:
            res = self.timed_stream_pass(cm, rows, sampled_token_ids, aux_hidden_states,
                                         n_sampled, n_draft, depth)
            if res is None:  # a rank without gathered logits; the driver rank's drafts are used
                return drafts
            ids, prob, anchor_pos, _ = res
            ids, prob = ids.to("cpu"), prob.to("cpu", torch.float32)
        elif cands is None:
            report.trace(self, reqs, 0, 0)
            report.maybe_report(self)
            return drafts
        choice = self.policy.decide(prob, reqs, cands)
        lengths = choice.lengths.tolist()
        id_rows = ids.tolist() if ids is not None else None
        prob_rows = prob.tolist() if prob is not None else None
        req_ids = self.runner.req_ids()
        for j, (r, n) in enumerate(zip(rows, lengths)):
            if not n:
                continue
            source = choice.source[j]
            if source == STREAMS:
                drafts[r] = id_rows[j][:n]
                self._pending[req_ids[r]] = (STREAMS, prob_rows[j][:n])
            else:
                drafts[r] = matches[j].token_ids[:n]
                self._pending[req_ids[r]] = (source, matches[j].confidence[:n])
            self.last_sources[r] = source
        if self._draft_log:
            report.log_drafts(self, rows, sampled_token_ids, anchor_pos, id_rows, matches,
                              choice.source, drafts)
        report.trace(self, reqs, depth if ids is not None else 0, sum(lengths))
        report.maybe_report(self)
        return drafts

    def _candidates(self, matches) -> Candidates:
        w = self.match_tokens
        rows, lengths = [], []
        for m in matches:       # lists, one array each: per-row arrays cost more a request
            n = min(len(m.token_ids), w) if m is not None else 0
            rows.append(m.confidence[:n] + [0.0] * (w - n) if n else [0.0] * w)
            lengths.append(n)
        return Candidates(self.match.name, np.array(rows, dtype=np.float64),
                          np.array(lengths, dtype=np.int64))

    def _observe(self, num_reqs: int, n_sampled: list[int], n_draft: list[int]) -> None:
        """Feed the policy last step's cost and its drafts' fate."""
        clock = self.runner.step_clock()
        rec = clock.take_finished() if clock is not None else None
        if clock is not None and clock.current is not None:   # this output is the current step's
            clock.current.produced = sum(n_sampled[:num_reqs])
            # the drafts this step verified are the ones proposed last step
            clock.current.matched = any(src != STREAMS for src, _ in self._pending.values())
        if rec is not None:
            self._last_period = rec.period
            if self.passes is not None:
                self.passes.observe(rec.num_reqs, rec.draft_pass, rec.period)
            self.policy.observe_step(rec.num_tokens, rec.num_draft_tokens, rec.period,
                                     rec.draft_seconds, rec.draft_stream_tokens, rec.draft_passes)
            if rec.num_draft_tokens > 0 and rec.produced > 0:
                self.policy.observe_outcome(rec.num_reqs, rec.produced, rec.period, rec.matched)
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        req_ids = self.runner.req_ids()
        by_source: dict[str, tuple[list, list, list]] = {}
        for i in range(min(num_reqs, len(req_ids), len(n_sampled), len(n_draft))):
            entry = pending.get(req_ids[i])
            d = n_draft[i]
            if entry is None or d == 0 or n_sampled[i] == 0:
                continue
            source, p = entry
            probs, drafted, accepted = by_source.setdefault(source, ([], [], []))
            probs.append(p)
            drafted.append(min(d, len(p)))
            accepted.append(min(n_sampled[i] - 1, d))
            counts = self.source_counts.setdefault(source, [0, 0, 0])
            counts[0] += 1
            counts[1] += drafted[-1]
            counts[2] += accepted[-1]
        for source, (probs, drafted, accepted) in by_source.items():
            w = self.num_streams if source == STREAMS else self.match_tokens
            rows = [p[:w] + [0.0] * (w - len(p[:w])) for p in probs]
            self.policy.observe_acceptance(rows, drafted, accepted, source)

    def timed_stream_pass(self, cm, rows, sampled_token_ids, aux_hidden_states, n_sampled,
                          n_draft, g: int):
        """:meth:`_stream_pass`, its host-side seconds and size on the step clock."""
        t0 = time.perf_counter()
        res = self._stream_pass(cm, rows, sampled_token_ids, aux_hidden_states, n_sampled,
                                n_draft, g)
        clock = self.runner.step_clock()
        if res is not None and clock is not None and clock.current is not None:
            clock.current.draft_seconds = time.perf_counter() - t0
            clock.current.draft_stream_tokens = len(rows) * res[0].shape[1]
            clock.current.draft_passes = res[0].shape[1] if self.model.stream_settings.chain else 1
        return res

    def _stream_pass(self, cm, rows: list[int], sampled_token_ids, aux_hidden_states,
                     n_sampled: list[int], n_draft: list[int], g: int):
        """Streams 1..g of the requests ``rows``: (draft ids [R, k], probabilities [R, k],
        both on the device; anchor positions [R] and the tokens sampled at the anchors [R],
        numpy); k = g, or fewer when chain streams stop early (the policy sees nothing left
        worth a pass). Host arithmetic in numpy: nothing here reads the device."""
        self._ensure_groups()
        num_reqs = cm.num_reqs
        r = np.asarray(rows, dtype=np.int64)
        ns, nd = np.asarray(n_sampled, dtype=np.int64), np.asarray(n_draft, dtype=np.int64)
        # rejected tokens of each request: the anchor sits that many tokens before the end
        rejected = np.maximum(nd[:num_reqs] - (ns[:num_reqs] - 1), 0)
        qsl = host_numpy(cm.query_start_loc_cpu)[: num_reqs + 1].astype(np.int64)
        seq_lens = host_seq_lens(cm)[:num_reqs]
        anchor_tok = (qsl[1:] - 1 - rejected)[r]
        anchor_pos = (seq_lens - 1 - rejected)[r]
        aux = aux_hidden_states[0]
        # x_{t+1}: the token just sampled at the anchor (next-token-aware streams read it)
        next_list = [sampled_token_ids[i][-1] for i in rows]
        bt = cm.block_table_tensor
        block_table = bt[torch.from_numpy(r).to(bt.device)]
        if self._anchor_rows is not None:
            h = aux[torch.from_numpy(anchor_tok).to(self.device)]  # [R, d]
            res = self._anchor_streams(h, anchor_tok, anchor_pos, block_table, g)
            return None if res is None else (res[0], res[1], anchor_pos, next_list)
        self.pass_counts["separate"] += 1
        if not self.model.stream_settings.chain:
            res = self._run_streams(aux, anchor_tok, next_list, anchor_pos, block_table, 0, g)
            return None if res is None else (res[0], res[1], anchor_pos, next_list)
        # chain form: one stream per pass, each reading the previous pass's draft (its keys
        # and values are in the cache at t+j by then, so stream j attends to streams < j)
        R = len(rows)
        ids_cols, prob_cols = [], []
        tok = next_list
        for j in range(g):
            res = self._run_streams(aux, anchor_tok, tok, anchor_pos, block_table, j, 1)
            if res is not None:
                ids_cols.append(res[0][:, 0].to("cpu"))
                prob_cols.append(res[1][:, 0].to("cpu"))
            more = j + 1 < g and res is not None and self.policy.continue_chain(
                torch.stack(prob_cols, 1), R)
            # every TP rank runs the same passes on rank 0's drafts
            agreed = vllm_ops.tp_agree([int(more)] + (ids_cols[-1].tolist() if res is not None
                                                    else [0] * R))
            if not agreed[0]:
                break
            tok = agreed[1:]
        if not ids_cols:
            return None
        return torch.stack(ids_cols, 1), torch.stack(prob_cols, 1), anchor_pos, next_list

    def _anchor_streams(self, h, anchor_tok: np.ndarray, anchor_pos: np.ndarray, block_table,
                        g: int):
        """Streams 1..g of the anchor form: the fused forward's rows of these anchors, or a
        separate query-only pass over the top layers; as :meth:`_run_streams`."""
        R = len(anchor_pos)
        hidden = self._anchor_rows.fused_hidden(anchor_tok, g)
        self.pass_counts["fused" if hidden is not None else "separate"] += 1
        if hidden is None:
            rows = self._anchor_rows.separate(anchor_pos, block_table, g)
            hidden = self.model.query_only_forward(self.model.stream_inputs(h, None, g), rows)
        res = self.model.draft_token_ids(hidden)
        if res is None:
            return None
        ids, prob = res
        return ids.view(R, g), prob.view(R, g).float()

    def _run_streams(self, aux, anchor_tok: np.ndarray, tokens: list[int], anchor_pos: np.ndarray,
                     block_table, first: int, g: int):
        """Streams first+1..first+g of every active request in one pass over the top layers,
        written to the cache at t+first+1..t+first+g: (draft ids [R, g], probabilities
        [R, g]) on the device, or None on a rank that does not receive the gathered logits.
        ``aux``: the verification's aux hidden states, read at the anchors' tokens
        ``anchor_tok``; ``tokens``: the token each request's streams read (x_{t+1}, or in
        the chain form the previous stream's draft). The inputs go in row by row (one row
        per stream token), the host arithmetic in numpy."""
        R = len(anchor_pos)
        h_rows = aux[torch.from_numpy(np.repeat(anchor_tok, g)).to(self.device)]
        next_rows = torch.from_numpy(np.repeat(np.asarray(tokens, dtype=np.int64), g)).to(self.device)
        stream_idx = torch.from_numpy(np.tile(np.arange(first, first + g), R)).to(self.device)
        pos = (anchor_pos[:, None] + np.arange(first + 1, first + g + 1)).reshape(-1)
        bs = self._block_size
        dev = block_table.device
        req_rows = torch.from_numpy(np.repeat(np.arange(R), g)).to(dev)
        blocks = block_table[req_rows, torch.from_numpy(pos // bs).to(dev)].to(torch.int64)
        slots = blocks * bs + torch.from_numpy(pos % bs).to(dev)
        seq = (anchor_pos + 1 + first + g).astype(np.int32)
        draft_cm = draft_common_metadata(
            query_start_loc_cpu=torch.arange(R + 1, dtype=torch.int32) * g,
            seq_lens_cpu=torch.from_numpy(seq),
            max_seq_len=int(seq.max()),
            positions=torch.from_numpy(pos).to(self.device),
            slot_mapping=slots.to(self.device),
            block_table=block_table,
            query_len=g,
            device=self.device,
        )
        per_layer = layer_metadata(self._groups, draft_cm, first)
        positions = draft_cm.positions
        if self.model.stream_attend is not None:     # the kernels read the metadata bound here
            cpu_stream_attention.bind(per_layer, draft_cm.slot_mapping)
            res = self.model.stream_draft(h_rows, next_rows, stream_idx, positions)
        else:
            with forward_context(per_layer, self.vllm_config, R * g, draft_cm.slot_mapping,
                                 self._layer_names):
                res = self.model.stream_draft(h_rows, next_rows, stream_idx, positions)
        if res is None:
            return None
        ids, prob = res
        return ids.view(R, g), prob.view(R, g).float()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile a compiled stream pass now, at start-up, not in the first requests that
        draft (about 17 s, and 12 s more for the first one-row pass, on 2 cores for
        SmolLM2): one pass over every stream and one over a single row (torch.compile
        specialises size 1), both for a pseudo-request whose stream slots lie in the KV
        cache's block 0, vLLM's null block, which holds no request's keys."""
        model = self.model
        if (model is None or getattr(model, "_compiled_stream_draft", None) is None
                or model.stream_settings.query_only):
            return
        t0 = time.perf_counter()
        try:
            self._ensure_groups()
            dtype = self.vllm_config.model_config.dtype
            aux = torch.zeros(1, model.stream_embeddings.shape[-1], dtype=dtype, device=self.device)
            block_table = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
            anchor = np.zeros(1, dtype=np.int64)
            widths = (1,) if model.stream_settings.chain else sorted({self.num_streams, 1})
            for g in reversed(widths):
                self._run_streams(aux, anchor, [0], anchor, block_table, 0, g)
        except Exception:
            if self._raise_errors or vllm_ops.tp_world_size() > 1:
                raise
            logger.warning("specstream: warming up the compiled stream pass failed; it "
                           "compiles in the first requests instead", exc_info=True)
            return
        logger.info("specstream: compiled stream pass warmed up in %.1f s",
                    time.perf_counter() - t0)

    def summary(self) -> dict:
        return report.summary(self)

    # The runner may call these for model-based drafters; streams need nothing extra.
    def dummy_run(self, *args, **kwargs) -> None:
        return None
