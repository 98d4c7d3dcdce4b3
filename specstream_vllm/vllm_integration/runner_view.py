"""What the proposer may read of vLLM's model runner, and nothing else.

The proposer never holds the runner itself: this view exposes the persistent batch's
request ids and tokens, the step clock the runner patch keeps, and the attention groups
and block size of the KV cache that the stream layers share with the target. Attribute
names are those of vLLM 0.32.0's ``GPUModelRunner`` / ``InputBatch``.
"""
from __future__ import annotations

from .match_source import TokenView
from .step_clock import StepClock

#: runner attributes set by patches/runner.py: the step clock, this step's draft sources
CLOCK_ATTR = "_specstream_clock"
SOURCES_ATTR = "_specstream_sources"


class RunnerView:
    __slots__ = ("_runner",)

    def __init__(self, runner):
        self._runner = runner

    def req_ids(self) -> list[str | None]:
        """Request id of each row of the persistent batch (None: an empty row)."""
        return self._runner.input_batch.req_ids

    def step_clock(self) -> StepClock | None:
        return self._runner.__dict__.get(CLOCK_ATTR)

    def token_view(self, num_reqs: int) -> TokenView:
        """The first ``num_reqs`` rows of the persistent batch (after the step's
        bookkeeping: the tokens sampled this step are in)."""
        batch = self._runner.input_batch
        return TokenView(req_ids=list(batch.req_ids[:num_reqs]), token_ids=batch.token_ids_cpu,
                         num_tokens=batch.num_tokens_no_spec,
                         num_prompt_tokens=batch.num_prompt_tokens,
                         max_model_len=int(self._runner.max_model_len))

    def num_prompt_tokens(self, num_reqs: int):
        """Prompt length of each of the first ``num_reqs`` rows (a numpy view)."""
        return self._runner.input_batch.num_prompt_tokens[:num_reqs]

    def request_maps(self) -> dict[str, dict]:
        """The runner's per-request maps (vLLM's ``requests``, the runner patch's draft
        sources), for the state-size log; read, never changed."""
        out = {"requests": self._runner.requests}
        sources = self._runner.__dict__.get(SOURCES_ATTR)
        if sources is not None:
            out[SOURCES_ATTR] = sources
        return out

    def block_size(self, kv_cache_gid: int) -> int:
        """Block size the runner's slot mappings use for this KV cache group."""
        return self._runner.input_batch.block_table.block_tables[kv_cache_gid].block_size

    def attention_groups(self, layer_names: list[str]):
        """``(kv cache group id, [(attention group, its names among layer_names)])``: the
        target's attention groups that hold ``layer_names``, all in one KV cache group."""
        wanted = set(layer_names)
        found = []
        gid = None
        for g_id, groups in enumerate(self._runner.attn_groups):
            for group in groups:
                names = wanted & set(group.layer_names)
                if names:
                    found.append((group, sorted(names)))
                    gid = g_id if gid is None else gid
                    if g_id != gid:
                        raise RuntimeError(
                            "specstream needs all stream layers in one KV cache group; these "
                            f"layers span groups {gid} and {g_id}: {sorted(layer_names)}")
        if not found:
            raise RuntimeError(f"no attention group of the served model holds the stream "
                               f"layers {layer_names}; is the checkpoint's num_stream_layers "
                               "within the model's layers?")
        return gid, found
