"""The vLLM functions the proposer calls besides attention: tensor-parallel agreement
and the n-gram kernel handed to the match source."""
from __future__ import annotations

import torch


def tp_world_size() -> int:
    from vllm.distributed import get_tensor_model_parallel_world_size
    return get_tensor_model_parallel_world_size()


def tp_agree(values: list[int]) -> list[int]:
    """Rank 0's ``values`` on every TP rank (the draft pass runs collectives, so all
    ranks must skip it or run it with the same depth)."""
    if tp_world_size() == 1:
        return values
    from vllm.distributed.parallel_state import get_tp_group
    t = torch.tensor(values, dtype=torch.int64)
    group = get_tp_group()
    torch.distributed.broadcast(t, src=group.ranks[0], group=group.cpu_group)
    return t.tolist()


def ngram_kernel():
    """vLLM's prompt-lookup kernel (NgramProposer's numba function, vLLM 0.32.0):
    ``(context int32[n], min_n, max_n, max_model_len, k) -> draft int32[<=k]``."""
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens
    return _find_longest_matched_ngram_and_propose_tokens
