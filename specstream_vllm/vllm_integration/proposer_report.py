"""What the proposer tells people: the periodic log line, the policy dump and trace, and
the draft log the tests replay against the reference model.

Functions of a :class:`~.proposer.SpecStreamProposer`; none of them changes a draft.
"""
from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger("vllm.specstream")
_LOG_EVERY_S = 30.0


def summary(p) -> dict:
    """The policy's state plus the per-source counters and the match source's state."""
    out = p.policy.summary()
    out["sources"] = {name: {"drafts": c[0], "draft_tokens": c[1], "accepted_tokens": c[2]}
                      for name, c in p.source_counts.items()}
    out["match"] = p.match.state() if p.match is not None else None
    own = getattr(p.model, "draft_dtype", None)   # the stream layers' own copies, if any
    out["draft_precision"] = "exact" if own is None else str(own).removeprefix("torch.")
    out["errors"] = p.errors
    out["draft_passes"] = dict(p.pass_counts)
    out["draft_pass"] = {"setting": p.draft_pass,
                         "buckets": p.passes.table() if p.passes is not None else None}
    out["draft_output"] = "device" if p.device_path is not None else "host"
    return out


def trace(p, reqs: int, depth: int, drafts: int) -> None:
    """``SPECSTREAM_POLICY_TRACE``: one JSON line per decision."""
    if not p._policy_trace:
        return
    pol = p.policy
    rec = {"pid": os.getpid(), "step": pol.stats.steps, "reqs": reqs, "depth": depth,
           "drafts": drafts, "last_step_s": p._last_period,
           "verify_w": pol.verify.weights().tolist() if pol.verify.ready else None,
           "draft_w": pol.draft.weights().tolist() if pol.draft.ready else None,
           "profile": [None if x != x else round(x, 3) for x in pol.profile.tolist()]}
    with open(p._policy_trace, "a") as f:
        f.write(json.dumps(rec) + "\n")


def maybe_report(p, force: bool = False) -> None:
    """``SPECSTREAM_POLICY_DUMP`` every 10 policy steps; the log line every 30 s."""
    pol = p.policy
    if p._policy_dump and (force or pol.stats.steps % 10 == 0):
        tmp = f"{p._policy_dump}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary(p), f)
        os.replace(tmp, p._policy_dump)
    now = time.monotonic()
    if now - p._last_log >= _LOG_EVERY_S:
        p._last_log = now
        s = pol.stats.as_dict()
        cal = ", ".join(f"{c['observed']:.2f}/{c['predicted']:.2f}" for c in pol.calib.per_position()
                        if c["n"])
        src = "; ".join(f"{name} {c[0]} drafts, {c[2]}/{c[1]} tokens accepted"
                        for name, c in p.source_counts.items())
        logger.info("specstream draft policy (%s): %d steps, %d without speculation, "
                    "%.2f draft tokens per step (%.2f per request), probes %d; "
                    "acceptance observed/predicted per position: %s; by source: %s",
                    pol.cfg.mode, s["steps"], s["steps_without_speculation"],
                    s["mean_draft_tokens_per_step"], s["mean_draft_tokens_per_request_step"],
                    s["probes"], cal or "-", src)


def log_drafts(p, rows, sampled_token_ids, anchor_pos, stream_ids, matches, sources,
               drafts) -> None:
    """``SPECSTREAM_DRAFT_LOG``, one line per request and step with a candidate: the context
    up to the anchor (its first "prompt_len" tokens the prompt), the token sampled there
    (next-token-aware streams read it), the streams' drafts as far as the pass ran
    ("drafts", [] without a pass: tests replay the reference on them), the match source's
    draft ("match"), the source taken ("source": "streams", the match source, or null)
    and the tokens proposed ("sent")."""
    view = p.runner.token_view(max(rows) + 1)
    tokens, num_tokens = view.token_ids, view.num_tokens
    with open(p._draft_log, "a") as f:
        for j, r in enumerate(rows):
            sd = stream_ids[j] if stream_ids is not None else []
            md = matches[j].token_ids if matches is not None and matches[j] is not None else []
            if not sd and not md:
                continue
            # the anchor: the stream pass's, or the token before the last sampled one
            anchor = int(anchor_pos[j]) if anchor_pos is not None else int(num_tokens[r]) - 2
            f.write(json.dumps({"context": tokens[r, : anchor + 1].tolist(),
                                "prompt_len": int(view.num_prompt_tokens[r]),
                                "next_token": int(sampled_token_ids[r][-1]),
                                "drafts": sd, "match": md, "source": sources[j],
                                "sent": drafts[r]}) + "\n")
