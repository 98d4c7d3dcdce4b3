"""``dtype="auto"`` chosen by measurement (specstream_vllm/dtype_choice.py) and served so by
``vllm serve`` / ``LLM`` with method specstream (vllm_integration/patches/dtype.py).

Fake /proc/cpuinfo texts stand for the CPUs; the probe cache is a temporary file.
"""
from __future__ import annotations

import logging

import pytest

from specstream_vllm import dtype_choice, hardware
from specstream_vllm.dtype_choice import choose_dtype, save_probe

AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
       "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n"
RIGHT_AND_FASTER = {"bf16_correct": True, "bf16_faster": True, "float32_tok_s": 30.0,
                    "bfloat16_tok_s": 40.0}
RIGHT_NOT_FASTER = dict(RIGHT_AND_FASTER, bf16_faster=False, bfloat16_tok_s=25.0)
WRONG = {"bf16_correct": False, "bf16_faster": False, "bfloat16_answer": "L'Étoile, la ..."}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "dtype-probe.json"
    monkeypatch.setattr(dtype_choice, "cache_path", lambda: path)
    monkeypatch.setattr(dtype_choice, "_FAILED", {})   # each test is a new process
    return path


@pytest.fixture
def amx_host(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(AMX)
    monkeypatch.setenv("SPECSTREAM_CPUINFO", str(fake))
    return fake


def test_auto_is_float32_on_any_cpu_without_a_probe(cache):
    for text in (AMX, ZEN4):
        for eager in (True, False):
            dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=eager, cpuinfo=text)
            assert dtype == "float32"
            assert "no bfloat16 probe cached" in why and "specstream check-dtype" in why
    assert "--enforce-eager" in choose_dtype("auto", platform="cpu", enforce_eager=True,
                                             cpuinfo=AMX)[1]


def test_auto_is_bfloat16_only_where_measured_right_and_faster_in_that_mode(cache):
    save_probe(RIGHT_AND_FASTER, enforce_eager=False, cpuinfo=AMX)
    assert choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=AMX)[0] == "bfloat16"
    # the same CPU in the other mode, and another CPU, were never measured
    assert choose_dtype("auto", platform="cpu", enforce_eager=True, cpuinfo=AMX)[0] == "float32"
    assert choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=ZEN4)[0] == "float32"
    save_probe(RIGHT_NOT_FASTER, enforce_eager=True, cpuinfo=AMX)
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=True, cpuinfo=AMX)
    assert dtype == "float32" and "not faster" in why
    save_probe(WRONG, enforce_eager=False, cpuinfo=ZEN4)
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=ZEN4)
    assert dtype == "float32" and "wrong answer" in why
    assert choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=AMX)[0] == "bfloat16"


def _fake_probe(monkeypatch, verdicts: dict):
    """run_probe replaced by one that stores ``verdicts[mode]`` (or raises it) and counts calls."""
    calls = []

    def run_probe(enforce_eager):
        calls.append(hardware.mode_name(enforce_eager))
        verdict = verdicts[calls[-1]]
        if isinstance(verdict, Exception):
            raise verdict
        save_probe(verdict, enforce_eager)
        return verdict
    monkeypatch.setattr(dtype_choice, "run_probe", run_probe)
    return calls


def test_auto_probes_once_per_mode_at_start_and_serves_what_it_found(cache, amx_host,
                                                                        monkeypatch):
    monkeypatch.setenv("SPECSTREAM_DTYPE_PROBE_ON_START", "1")
    calls = _fake_probe(monkeypatch, {"compiled": RIGHT_AND_FASTER, "eager": WRONG})
    assert choose_dtype("auto", platform="cpu", enforce_eager=False)[0] == "bfloat16"
    assert choose_dtype("auto", platform="cpu", enforce_eager=False)[0] == "bfloat16"
    assert calls == ["compiled"]  # the second start read the cache
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=True)
    assert dtype == "float32" and "wrong answer" in why
    choose_dtype("bfloat16", platform="cpu", enforce_eager=False)
    choose_dtype("auto", platform="cuda", enforce_eager=False)
    assert calls == ["compiled", "eager"]  # explicit dtypes and GPUs never probe


def test_auto_serves_float32_when_the_start_up_probe_is_off_or_fails(cache, amx_host,
                                                                     monkeypatch):
    calls = _fake_probe(monkeypatch, {"compiled": RuntimeError("engine start timed out\n...")})
    monkeypatch.setenv("SPECSTREAM_DTYPE_PROBE_ON_START", "0")
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=False)
    assert dtype == "float32" and "SPECSTREAM_DTYPE_PROBE_ON_START=0" in why and calls == []
    monkeypatch.setenv("SPECSTREAM_DTYPE_PROBE_ON_START", "1")
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=False)
    assert dtype == "float32" and "start-up probe failed: engine start timed out" in why
    assert dtype_choice.cached_probe(False) is None  # not cached: the next process tries again
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=False)
    assert dtype == "float32" and "failed earlier in this process: engine start timed out" in why
    assert calls == ["compiled"]                     # ... but not this one
    dtype_choice._FAILED.clear()                     # a new process
    choose_dtype("auto", platform="cpu", enforce_eager=False)
    assert calls == ["compiled", "compiled"]
    dtype_choice._FAILED.clear()
    blocked = cache.parent / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setattr(dtype_choice, "cache_path", lambda: blocked / "dtype-probe.json")
    dtype, why = choose_dtype("auto", platform="cpu", enforce_eager=False)
    assert dtype == "float32" and "start-up probe failed" in why   # no cache folder: no crash


def test_cache_key_includes_the_vllm_version(cache, monkeypatch):
    save_probe(RIGHT_AND_FASTER, enforce_eager=False, cpuinfo=AMX)
    monkeypatch.setattr(dtype_choice, "vllm_version", lambda: "0.99.0")
    assert choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=AMX)[0] == "float32"


def test_explicit_bf16_is_kept_and_warned_about(cache):
    dtype, why = choose_dtype("bfloat16", platform="cpu", enforce_eager=False, cpuinfo=ZEN4)
    assert dtype == "bfloat16" and "WARNING" in why and "known to give wrong text in compiled" in why
    why = choose_dtype("bfloat16", platform="cpu", enforce_eager=True, cpuinfo=AMX)[1]
    assert "never checked in eager" in why      # AMX's eager fault is repaired by the plugin
    dtype, why = choose_dtype("bfloat16", platform="cpu", enforce_eager=False, cpuinfo=AMX)
    assert "never checked" in why and "specstream check-dtype" in why   # no cache: say so
    save_probe(RIGHT_AND_FASTER, enforce_eager=False, cpuinfo=AMX)
    assert "WARNING" not in choose_dtype("bfloat16", platform="cpu", enforce_eager=False,
                                         cpuinfo=AMX)[1]
    save_probe(WRONG, enforce_eager=False, cpuinfo=AMX)
    why = choose_dtype("torch.bfloat16", platform="cpu", enforce_eager=False, cpuinfo=AMX)[1]
    assert "found bfloat16 answering wrong" in why and "float32" in why
    assert choose_dtype("float32", platform="cpu", enforce_eager=False, cpuinfo=AMX) == \
        ("float32", "float32 as requested")


def test_gpu_passes_through(cache):
    save_probe(WRONG, enforce_eager=False, cpuinfo=AMX)
    for requested in ("auto", "bfloat16", "float16"):
        assert choose_dtype(requested, platform="cuda", enforce_eager=False,
                            cpuinfo=AMX)[0] == requested


def test_corrupt_cache_counts_as_absent(cache):
    cache.write_text("{not json")
    assert choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=AMX)[0] == "float32"
    save_probe(RIGHT_AND_FASTER, enforce_eager=False, cpuinfo=AMX)   # rewrites it whole
    assert choose_dtype("auto", platform="cpu", enforce_eager=False, cpuinfo=AMX)[0] == "bfloat16"


def test_probe_verdict_needs_the_same_leading_tokens_and_the_answer(monkeypatch):
    texts = {(1, 2, 3): "The capital of France is Paris.", (1, 2, 9): "The capital is Paris.",
             (7, 7, 7): "L'Étoile, la Marseillaise"}
    monkeypatch.setattr(dtype_choice, "_decode", lambda model, ids: texts[tuple(ids)])
    fast = [{"float32": 10.0, "bfloat16": 20.0}] * 3
    ok = dtype_choice.judge("m", {"float32": [1, 2, 3], "bfloat16": [1, 2, 3]}, fast)
    assert ok["bf16_correct"] and ok["bf16_faster"] and ok["bf16_speedup"] == 2.0
    bad = dtype_choice.judge("m", {"float32": [1, 2, 3], "bfloat16": [7, 7, 7]}, fast)
    assert not bad["bf16_correct"] and not bad["bf16_faster"]
    drift = dtype_choice.judge("m", {"float32": [1, 2, 3], "bfloat16": [1, 2, 9]}, fast)
    assert not drift["bf16_correct"]            # "Paris" alone is not agreement
    with pytest.raises(RuntimeError, match="float32 reference"):
        dtype_choice.judge("m", {"float32": [7, 7, 7], "bfloat16": [1, 2, 3]}, fast)


def test_probe_speed_is_the_median_per_prompt_ratio(monkeypatch):
    """One fast outlier does not decide, and a lead under BF16_MIN_SPEEDUP keeps float32."""
    monkeypatch.setattr(dtype_choice, "_decode", lambda model, ids: "Paris")
    same = {"float32": [1, 2, 3], "bfloat16": [1, 2, 3]}
    outlier = [{"float32": 10.0, "bfloat16": 9.0}] * 4 + [{"float32": 10.0, "bfloat16": 90.0}]
    v = dtype_choice.judge("m", same, outlier)
    assert not v["bf16_faster"] and v["bf16_speedup"] == 0.9 and v["rounds"] == 5
    slight = [{"float32": 10.0, "bfloat16": 10.3}] * 3
    assert not dtype_choice.judge("m", same, slight)["bf16_faster"]
    clear = [{"float32": 10.0, "bfloat16": 14.0}] * 3
    assert dtype_choice.judge("m", same, clear)["bf16_faster"]


# ------------------------------------------------------------ SpeculativeEngine and vLLM

def test_speculative_engine_serves_float32_on_amx_eager(cache, amx_host, smollm2_dir,
                                                         shipped_streams):
    """The failing case: AMX, eager, dtype auto (bf16 there answers "L'Étoile, ...")."""
    from specstream_vllm.training.recipe import DataSpec
    assert DataSpec().vllm_dtype == "float32"
    if shipped_streams is None:
        pytest.skip("no shipped streams")
    from specstream_vllm import SpeculativeEngine
    assert SpeculativeEngine(lazy=True, enforce_eager=True).llm_kwargs()["dtype"] == "float32"
    assert SpeculativeEngine(lazy=True, dtype="bfloat16").llm_kwargs()["dtype"] == "bfloat16"
    save_probe(RIGHT_AND_FASTER, enforce_eager=False)
    assert SpeculativeEngine(lazy=True).llm_kwargs()["dtype"] == "bfloat16"
    assert SpeculativeEngine(lazy=True, enforce_eager=True).llm_kwargs()["dtype"] == "float32"


@pytest.fixture
def dtype_patch():
    from specstream_vllm.vllm_integration.patches.dtype import EngineArgsDtypePatch
    applied = EngineArgsDtypePatch.apply_once()
    yield EngineArgsDtypePatch
    if applied:
        EngineArgsDtypePatch.remove()


@pytest.fixture
def log_records():
    """The dtype records of the "vllm.specstream" logger (vLLM's loggers do not propagate to
    caplog; the plugin's other start-up messages are not these tests' business)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(lambda record: "dtype" in record.getMessage())
    log = logging.getLogger("vllm.specstream")
    log.addHandler(handler)
    level, _ = log.level, log.setLevel(logging.INFO)
    dtype_choice._ANNOUNCED.clear()
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


def _served_dtype(model_dir, **kw) -> str:
    from vllm.engine.arg_utils import EngineArgs
    args = EngineArgs(model=str(model_dir), max_model_len=512, **kw)
    before = args.dtype
    dtype = str(args.create_model_config().dtype).replace("torch.", "")
    assert args.dtype == before          # the user's arguments are left as given
    return dtype


def test_vllm_serves_specstream_auto_in_the_chosen_dtype(cache, amx_host, smollm2_dir, dtype_patch,
                                                         log_records):
    spec = {"method": "specstream", "num_speculative_tokens": 4}
    plain = _served_dtype(smollm2_dir)
    assert plain == "bfloat16"           # vLLM's own auto: the checkpoint's dtype
    assert not log_records
    assert _served_dtype(smollm2_dir, speculative_config=spec, enforce_eager=True) == "float32"
    assert [r.getMessage()[:48] for r in log_records] == \
        ["specstream: serving dtype float32: no bfloat16 p"]
    save_probe(RIGHT_AND_FASTER, enforce_eager=False)
    assert _served_dtype(smollm2_dir, speculative_config=spec) == "bfloat16"
    assert _served_dtype(smollm2_dir, speculative_config=spec, enforce_eager=True) == "float32"
    # explicit dtypes, plain vLLM and other methods are untouched
    assert _served_dtype(smollm2_dir, speculative_config=spec, dtype="float16") == "float16"
    assert _served_dtype(smollm2_dir) == plain
    ngram = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    assert _served_dtype(smollm2_dir, speculative_config=ngram, enforce_eager=True) == plain


def test_explicit_bf16_on_amx_eager_warns_at_startup(cache, amx_host, smollm2_dir, dtype_patch,
                                                      log_records, monkeypatch):
    spec = {"method": "specstream", "num_speculative_tokens": 4}
    assert _served_dtype(smollm2_dir, speculative_config=spec, dtype="bfloat16",
                         enforce_eager=True) == "bfloat16"
    warnings = [r.getMessage() for r in log_records if r.levelno == logging.WARNING]
    # the plugin repairs AMX's eager fault: what is left is a bf16 nobody measured here
    assert warnings and "never checked in eager mode" in warnings[0]
    monkeypatch.setenv("SPECSTREAM_CPU_KERNEL_FIX", "0")   # vLLM-CPU's own kernel: wrong
    _served_dtype(smollm2_dir, speculative_config=spec, dtype="bfloat16", enforce_eager=True)
    warnings = [r.getMessage() for r in log_records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "wrong text in eager" in warnings[1]
