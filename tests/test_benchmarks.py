"""Tests of the benchmark harness, the counter reader and the child-engine protocol: pure parts
without vLLM, plus real offline and online smoke runs (marked ``vllm``)."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import offline, online, report, run
from benchmarks.methods import build_methods, count_safetensors_params
from benchmarks.workloads import is_heldout, parse_prompts_jsonl, sharegpt_prompts
from specstream_vllm.engine_job import EngineProcess, run_in_subprocess
from specstream_vllm.spec_counters import (ACCEPTED, DRAFTS, PER_POS, SpecCounters,
                                           from_prometheus_text, from_vllm_metrics)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks"


# ------------------------------------------------------------------ counters

def test_prometheus_parsing_and_delta() -> None:
    text = "\n".join([
        "# TYPE vllm:spec_decode_num_drafts counter",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0',
        'vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7e9',
        'vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 40.0',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 15.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 5.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 10.0',
        'vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 2.0',
        'vllm:spec_decode_specstream_source_drafts_total{engine="0",source="suffix"} 6',
    ])
    c = from_prometheus_text(text)
    assert (c.drafts, c.draft_tokens, c.accepted_tokens, c.accepted_per_pos) == (12, 40, 15, [10, 5])
    assert c.sources == {"suffix": [6, 0, 0]}
    d = c - SpecCounters(4, 16, 6, [4, 2])
    assert d.to_json()["mean_acceptance_length"] == pytest.approx(1 + 9 / 8)
    assert d.per_position_rate == pytest.approx([6 / 8, 3 / 8])


def test_vllm_metric_objects_and_engine_job_names_round_trip() -> None:
    metrics = [SimpleNamespace(name=DRAFTS, value=10), SimpleNamespace(name=ACCEPTED, value=15),
               SimpleNamespace(name=PER_POS, values=[10, 5]),
               SimpleNamespace(name="vllm:spec_decode_specstream_source_accepted_tokens", value=3,
                               labels={"source": "streams"}),
               SimpleNamespace(name="vllm:num_preemptions", value=7)]
    c = from_vllm_metrics(metrics)
    assert (c.drafts, c.accepted_tokens, c.accepted_per_pos, c.sources) == (10, 15, [10, 5],
                                                                          {"streams": [0, 0, 3]})
    raw = c.to_metrics()
    assert raw[DRAFTS] == 10 and raw["vllm:spec_decode_specstream_source_accepted_tokens{source=streams}"] == 3
    assert SpecCounters.from_metrics(raw) == c
    assert SpecCounters.from_json(c.to_json()) == c
    assert (c + c).drafts == 20 and (c - c).mean_acceptance_length != (c - c).mean_acceptance_length


# ------------------------------------------------------------------ child-engine protocol

def _helper_module(tmp_path: Path) -> dict:
    (tmp_path / "jobfns.py").write_text(
        "import time\n"
        "def echo(job):\n    return {'got': job['x']}\n"
        "def boom(job):\n    raise ValueError('bad job: ' + str(job['x']))\n"
        "def slow(job):\n    time.sleep(60)\n    return {}\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def test_engine_job_reports_result_failure_and_timeout(tmp_path: Path) -> None:
    env = _helper_module(tmp_path)
    ok = run_in_subprocess({"call": "jobfns:echo", "x": 3}, tmp_path / "w", "ok", 120, env)
    assert ok["status"] == "ok" and ok["got"] == 3
    bad = EngineProcess({"call": "jobfns:boom", "x": 4}, tmp_path / "w", "bad", env).wait(120)
    assert bad["status"] == "failed" and "ValueError: bad job: 4" in bad["error"]
    with pytest.raises(RuntimeError, match="bad job: 5"):
        run_in_subprocess({"call": "jobfns:boom", "x": 5}, tmp_path / "w", "bad2", 120, env)
    slow = EngineProcess({"call": "jobfns:slow"}, tmp_path / "w", "slow", env).wait(3)
    assert slow["status"] == "failed" and "timed out" in slow["error"]


# ------------------------------------------------------------------ offline rotation

class _FakeEngine:
    """Stands in for offline._Engine: 10 tok/s per prompt for the baseline, 15 for others."""

    started: list[str] = []

    def __init__(self, method, args, folder):
        self.name, self.start_s = method.name, 1.0
        self.rss = SimpleNamespace(peak_mib=100.0)
        self.policy_path = folder / "none.json"
        self.seen: list = []
        _FakeEngine.started.append(self.name)

    def run(self, prompts, timeout):
        self.seen += prompts
        rate = 10.0 if self.name == "baseline" else 15.0
        ids = [[1, 2, 3] if self.name == "baseline" or i else [1, 2, 4] for i in range(len(prompts))]
        return len(prompts) * 3 / rate, ids, SpecCounters(len(prompts), 4 * len(prompts),
                                                          len(prompts), [len(prompts)])

    def stop(self):
        pass


def test_offline_rotation_same_prompts_per_round_and_flags_repeats(monkeypatch, tmp_path,
                                                                   capsys) -> None:
    monkeypatch.setattr(offline, "_Engine", _FakeEngine)
    args = run.parse_args(["--batch-sizes", "1,4", "--rounds", "2", "--per-level", "2",
                           "--rounds-at", "4:1"])
    methods = build_methods(["baseline", "ngram"])
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(7)]
    saved = []
    res = offline.run_offline(methods, {"w": convs}, args, tmp_path, saved.append)
    # said before the engines start, with where the replays begin
    assert capsys.readouterr().out.startswith(
        "[bench] WARNING: workload w has 7 prompts and this run asks for 8; from batch 4 round 0")
    assert offline.replay_warning("w", 8, offline.level_sizes([1, 4], 2, 2, {4: 1})) is None
    assert [lv["batch_size"] for lv in res["levels"]] == [1, 4] and len(saved) == 2
    b1, b4 = res["levels"]
    assert len(b1["rounds"]) == 2 and len(b4["rounds"]) == 1
    assert list(b1["rounds"][0]) == ["baseline", "ngram"] and list(b1["rounds"][1]) == ["ngram", "baseline"]
    # 2 + 2 prompts at batch 1, then 4 at batch 4: the last one wraps around (7 prompts)
    assert b1["repeated"] == [0, 0] and b4["repeated"] == [1]
    md = "\n".join(report.offline_tables(res["levels"]))
    # 3 tokens per prompt, 1 accepted per prompt: 1.5 tokens per step; the first prompt of
    # every ngram call differs from the baseline
    assert "| ngram | 1 | 15.0 / 15.0 | 1.50x (1.50-1.50) | 0% | 1.50 | 2.00 | 1.00 |" in md
    assert "| ngram | 4 | 15.0 | 1.50x (1.50-1.50) | 75% | 1.50 | 2.00 | 1.00 |" in md
    assert "batch 4 round 0: 1" in md
    assert res["engines"]["ngram"]["peak_rss_mib"] == 100.0


def test_offline_dtype_methods_compare_text_within_their_dtype(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(offline, "_Engine", _FakeEngine)
    args = run.parse_args(["--batch-sizes", "1", "--rounds", "1", "--per-level", "2"])
    methods = build_methods(["baseline", "baseline%bfloat16", "ngram%bfloat16"])
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    res = offline.run_offline(methods, {"w": convs}, args, tmp_path, lambda _: None)
    md = "\n".join(report.offline_tables(res["levels"]))
    # speed against the run's baseline, text against the baseline in its own dtype
    assert "| ngram%bfloat16 | 1 | 15.0 | 1.50x (1.50-1.50) | 100% |" in md
    assert "| baseline%bfloat16 | 1 | 15.0 | 1.50x (1.50-1.50) | 100% |" in md


# ------------------------------------------------------------------ online

def test_online_commands_and_level_summary() -> None:
    job = {"model": "/m", "dtype": "float32", "max_model_len": 64, "seed": 0, "enforce_eager": True,
           "concurrencies": [1, 4], "speculative_config": None, "engine_args": {"async_scheduling": False}}
    serve = online.serve_cmd(job, 8000)
    assert "--no-async-scheduling" in serve and "--enforce-eager" in serve
    bench = online.bench_cmd(job, 8000, Path("/d.jsonl"), 8, 4, 32, Path("/r/x.json"))
    i = bench.index("bench")
    assert bench[i:i + 2] == ["bench", "serve"]
    for flag, value in (("--max-concurrency", "4"), ("--num-prompts", "8"), ("--temperature", "0"),
                        ("--ready-check-timeout-sec", "0"), ("--sharegpt-output-len", "32")):
        assert bench[bench.index(flag) + 1] == value
    assert "--no-oversample" in bench and "--disable-shuffle" in bench
    bench_result = {"completed": 7, "failed": 1, "total_output_tokens": 200, "duration": 10.0,
                    "output_throughput": 20.0, "median_ttft_ms": 50.0, "p90_ttft_ms": 90.0,
                    "median_tpot_ms": 5.0, "p90_tpot_ms": 9.0, "median_e2el_ms": 500.0,
                    "p90_e2el_ms": 900.0, "errors": ["", "boom", ""]}
    s = online.level_summary(4, bench_result)
    assert s["requests"] == 8 and s["failed"] == 1 and s["tokens_per_s"] == 20.0
    assert s["ttft"] == {"median_ms": 50.0, "p90_ms": 90.0} and s["errors"] == ["boom"]


def _level(c: int, tps: float, drafts: int = 0) -> dict:
    return {"concurrency": c, "tokens_per_s": tps, "failed": 0,
            "ttft": {"median_ms": 10.0, "p90_ms": 20.0}, "tpot": {"median_ms": 1.0, "p90_ms": 2.0},
            "latency": {"median_ms": 100.0, "p90_ms": 200.0},
            "spec": SpecCounters(drafts, 4 * drafts, drafts, [drafts]).to_json()}


def test_online_aggregate_ratio_per_repeat_and_failures() -> None:
    runs = [{"method": "baseline", "repeat": 0, "status": "ok", "levels": [_level(1, 10.0)]},
            {"method": "baseline", "repeat": 1, "status": "ok", "levels": [_level(1, 20.0)]},
            {"method": "specstream", "repeat": 0, "status": "ok", "peak_rss_mib": 5.0,
             "levels": [_level(1, 15.0, 10)]},
            {"method": "specstream", "repeat": 1, "status": "ok", "levels": [_level(1, 40.0, 10)]},
            {"method": "suffix", "repeat": 0, "status": "failed", "error": "ValueError: no"}]
    agg = report.aggregate_online(runs)
    row = agg["specstream"]["rows"][0]
    assert row["ratio"] == {"median": 1.75, "min": 1.5, "max": 2.0, "n": 2}
    assert row["spec"].drafts == 20 and row["spec"].mean_acceptance_length == 2.0
    assert agg["suffix"]["status"] == "failed"
    md = report.online_table(agg)
    assert "| specstream | 1 | 27.5 (15.0-40.0) | 1.75x (1.50-2.00) | 10 / 20 | 1.0 / 2.0 | 0 | 2.00 | 1.00 |" in md


def test_online_fresh_server_per_level_for_every_method_when_one_keeps_state(monkeypatch, tmp_path) -> None:
    calls: list[tuple[str, list[int]]] = []

    def fake(job, logs, tag, *rest):
        calls.append((tag, job["concurrencies"]))
        return {"status": "ok", "engine_start_s": 1.0, "peak_rss_mib": 1.0, "max_load1": 1.0,
                "wall_s": 1.0, "log": tag,
                "levels": [{"concurrency": c, "tokens_per_s": 1.0} for c in job["concurrencies"]]}

    monkeypatch.setattr(online, "run_method", fake)
    args = run.parse_args(["--mode", "online", "--repeats", "2"])
    base, suffix, ngram = build_methods(["baseline", "suffix", "ngram"])
    runs: list = []
    run.run_online_mode([base, suffix], {"concurrencies": [1, 16]}, args, tmp_path, lambda: None, runs)
    assert sorted(c for _, c in calls) == [[1]] * 4 + [[16]] * 4
    assert [r["method"] for r in runs] == ["baseline", "suffix", "suffix", "baseline"]
    assert [x["concurrency"] for x in runs[0]["levels"]] == [1, 16]
    calls.clear()
    run.run_online_mode([base, ngram], {"concurrencies": [1, 16]}, args, tmp_path, lambda: None, [])
    assert [c for _, c in calls] == [[1, 16]] * 4


# ------------------------------------------------------------------ CLI and reports

def test_results_folders_are_named_by_date_and_what_they_measure() -> None:
    day = dt.date(2026, 12, 4)
    a = run.parse_args(["--batch-sizes", "1,16"])
    assert run.default_folder(a, ["mtbench", "sharegpt"], day).name == "2026-12-04-mtbench-sharegpt-batch1-16"
    b = run.parse_args(["--mode", "online", "--concurrency", "1,32"])
    assert run.default_folder(b, ["mixed"], day).name == "2026-12-04-mixed-online-concurrency1-32"


def test_run_refuses_a_method_it_cannot_run_instead_of_timing_it_as_a_baseline(tmp_path, capsys) -> None:
    """``specstream-alt`` without ``--alt-streams`` has no speculative config: run anyway it
    would be a second no-speculation engine labelled specstream."""
    code = run.main(["--methods", "baseline,specstream-alt", "--model", str(tmp_path),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    assert "specstream-alt" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_reports_of_the_published_results(tmp_path: Path) -> None:
    """Every published results folder renders (command, machine, acceptance beside speed), and
    docs/benchmarks/README.md is what ``benchmarks.report --index`` generates from them."""
    folders = sorted(p for p in DOCS.iterdir() if (p / "results.json").is_file())
    assert folders, "no published results"
    for folder in folders:
        data = json.loads((folder / "results.json").read_text())
        md = report.render(data, folder.name)
        assert "- command: `" in md and "- machine: " in md and "mean accept len" in md, folder
        assert ("vs baseline" in md) and ("| specstream" in md), folder
    copy = tmp_path / "docs"
    shutil.copytree(DOCS, copy)
    index = report.write_index(copy).read_text()
    assert all(f"[{f.name}]({f.name}/report.md)" in index for f in folders)
    assert (DOCS / "README.md").read_text() == index, \
        "docs/benchmarks/README.md is stale: run python -m benchmarks.report --index docs/benchmarks"


# ------------------------------------------------------------------ workloads and methods

def test_parse_prompts_jsonl() -> None:
    text = "\n".join([json.dumps({"prompt": "hi"}), "",
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


def test_sharegpt_prompts_are_the_trainers_heldout_side() -> None:
    from specstream_vllm.training.data import conversation_split
    from specstream_vllm.training.recipe import DataSpec

    ids = [f"conv{i}" for i in range(2000)]
    held = [i for i in ids if is_heldout(i)]
    assert held == [i for i in ids if conversation_split(i, DataSpec().heldout_fraction) == "heldout"]
    assert 20 < len(held) < 200 and is_heldout(held[0] + "_3")
    prompts = sharegpt_prompts([(i, f"Question {i}") for i in ids], exclude={f"question {held[0]}"})
    assert {p.id for p in prompts} == {f"sharegpt-{i}" for i in held[1:]}


def test_methods_and_rotation(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert count_safetensors_params(tmp_path) == 17
    ms = {m.name: m for m in build_methods(["baseline", "ngram", "suffix", "specstream"],
                                           streams=str(tmp_path))}
    assert ms["baseline"].speculative_config is None
    assert ms["specstream"].speculative_config == {"method": "specstream", "model": str(tmp_path),
                                                   "num_speculative_tokens": 4}
    assert ms["specstream"].extra_params == 17 and ms["suffix"].keeps_request_state
    sync = build_methods(["baseline-sync"])[0]
    assert sync.speculative_config is None and sync.engine_args == {"async_scheduling": False}
    with pytest.raises(ValueError):
        build_methods(["nope"])
    ablated = build_methods(["specstream+off"], streams=str(tmp_path))[0]
    assert ablated.env == {"SPECSTREAM_POLICY_FORCE_OFF_STEPS": str(10**9)}
    assert "--alt-streams" in build_methods(["specstream-alt"], streams=str(tmp_path))[0].skip_reason
    fused = build_methods(["specstream-streams@fused"], streams=str(tmp_path))[0]
    assert fused.name == "specstream-streams@fused"
    assert fused.speculative_config["draft_pass"] == "fused" and fused.speculative_config["match"] == "none"
    with pytest.raises(ValueError, match="draft pass"):
        build_methods(["ngram@fused"])
    bf = build_methods(["specstream-streams@fused%bfloat16", "baseline-sync%bfloat16"],
                       streams=str(tmp_path))
    assert bf[0].engine_args == {"dtype": "bfloat16"} and bf[0].speculative_config["draft_pass"] == "fused"
    assert bf[1].engine_args == {"async_scheduling": False, "dtype": "bfloat16"}
    with pytest.raises(ValueError, match="dtype"):
        build_methods(["ngram%bf16"])
    assert offline.rotated([1, 2, 3], 1) == [2, 3, 1] and offline.rotated([1, 2, 3], 3) == [1, 2, 3]


# ------------------------------------------------------------------ real engines

def _smoke(tmp_path: Path, *extra: str) -> dict:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": q}) for q in
                                 ["What is the capital of France?", "Count from 1 to 10."]))
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "benchmarks.run", "--methods", "baseline,specstream",
           "--prompts", str(prompts), "--max-tokens", "16", "--max-model-len", "512",
           "--enforce-eager", "--dtype", "float32", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "report.md").is_file()
    return json.loads((out / "results.json").read_text())


@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_offline_smoke(tmp_path: Path) -> None:
    """Two prompts, batch 1, 16 tokens: both engines report tok/s, specstream drafts and its
    greedy outputs equal the baseline's (float32)."""
    data = _smoke(tmp_path, "--batch-sizes", "1", "--rounds", "1", "--per-level", "2")
    (rnd,) = data["levels"][0]["rounds"]
    assert rnd["baseline"]["tok_s"] > 0 and rnd["specstream"]["tok_s"] > 0
    assert rnd["specstream"]["spec"]["drafts"] > 0 and rnd["baseline"]["spec"]["drafts"] == 0
    assert rnd["specstream"]["token_ids"] == rnd["baseline"]["token_ids"]
    assert len(rnd["baseline"]["token_ids"]) == 2


@pytest.mark.vllm
@pytest.mark.timeout(1200)
def test_online_smoke(tmp_path: Path) -> None:
    """`vllm bench serve` at concurrency 1 over two prompts, against both servers."""
    data = _smoke(tmp_path, "--mode", "online", "--concurrency", "1", "--startup-timeout", "900")
    runs = {r["method"]: r for r in data["online"]["runs"]}
    for name in ("baseline", "specstream"):
        assert runs[name]["status"] == "ok", runs[name].get("error")
        (level,) = runs[name]["levels"]
        assert level["requests"] == 2 and level["failed"] == 0 and level["tokens_per_s"] > 0
        assert level["ttft"]["median_ms"] > 0
    assert runs["specstream"]["levels"][0]["spec"]["drafts"] > 0


# ------------------------------------------------------------------ kernel costs

def test_kernel_cost_smoke_writes_costs_rows_and_projection(tmp_path: Path) -> None:
    from benchmarks import kernel_cost

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 128}))
    out = tmp_path / "costs.json"
    doc = kernel_cost.main(["--config", str(cfg), "--batch", "1,2", "--iters", "1", "--warmup", "0",
                            "--stream-layers", "2", "--context", "8", "--draft-vocab", "32",
                            "--layers", "1", "--threads", "1", "--acceptance", "1.5,2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == doc and saved["machine"]["cpu_model"] and saved["settings"]["device"] == "cpu"
    st = saved["settings"]
    assert st["scaled"] is True and st["measured_layers"] == 1 and st["shape"]["layers"] == 4
    assert st["rows_per_sequence"] == {"decode": {"layers": 1}, "verify": {"layers": 5},
                                       "separate": {"top": 4}, "fused": {"bottom": 5, "top": 5 + 5 * 4}}
    assert [r["batch"] for r in saved["results"]] == [1, 2]
    assert all(0 < r["ms_least"][f] <= r["ms"][f] for r in saved["results"] for f in kernel_cost.FORMS)
    assert [(p["acceptance"], p["batch"]) for p in saved["projection"]] == [(1.5, 1), (1.5, 2), (2, 1), (2, 2)]
    unscaled = kernel_cost.main(["--config", str(cfg), "--batch", "1", "--iters", "1", "--warmup", "0",
                                 "--stream-layers", "4", "--context", "8", "--draft-vocab", "32"])
    assert unscaled["settings"]["scaled"] is False and "bottom" not in unscaled["settings"]["rows_per_sequence"]["fused"]
    # scaled: each stage's measured layers count for the stage's real layers, the head once
    setup = kernel_cost.Setup(kernel_cost.shape_from_config(cfg), 4, 1, 32, 8, measured_layers=2)
    scales = {f: [scale for _, scale in segs] for f, segs in kernel_cost.build_steps(setup, 1).items()}
    assert scales == {"decode": [2.0, 1.0], "verify": [2.0, 1.0], "separate": [1.0, 1.0],
                      "fused": [1.5, 1.0, 1.0]}
    setup = kernel_cost.Setup(setup.shape, 4, 1, 32, 8)
    assert all(len(segs) == 1 for segs in kernel_cost.build_steps(setup, 1).values())


def test_kernel_cost_projection_from_costs_and_acceptance_from_results(tmp_path: Path) -> None:
    from benchmarks import kernel_cost

    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"results": [{"model": "m", "batch": 1, "ms": {
        "decode": 10.0, "verify": 12.0, "separate": 3.0, "fused": 14.0}}]}))
    doc = kernel_cost.main(["--from-costs", str(costs), "--acceptance", "2"])
    assert doc["projection"] == [{"model": "m", "batch": 1, "acceptance": 2.0, "ratio_separate": 1.333,
                                  "ratio_fused": 1.429, "better": "fused"}]
    # offline rounds and online runs are both read; the online aggregate is not counted twice
    offline = DOCS / "2026-12-01-peers-batch1-16" / "results.json"
    total = SpecCounters()
    for level in json.loads(offline.read_text())["levels"]:
        for rnd in level["rounds"]:
            total = total + SpecCounters.from_json(rnd["specstream"]["spec"])
    assert kernel_cost.spec_totals(offline) == total
    online = DOCS / "2026-12-01-online-concurrency1-32" / "results.json"
    runs = json.loads(online.read_text())["online"]["runs"]
    total = sum((SpecCounters.from_json(lv["spec"]) for r in runs if r["method"] == "specstream"
                 for lv in r["levels"]), SpecCounters())
    assert kernel_cost.spec_totals(online) == total
    with pytest.raises(SystemExit, match="no drafts of method 'nope'"):
        kernel_cost.spec_totals(online, "nope")


def test_kernel_cost_stream_rows_leave_the_verified_rows_alone() -> None:
    """In the one-pass form a stream row sees the context up to its anchor and writes no KV: the
    verified rows come out as in verification alone, and a stream row as if run by itself; the
    grouped-query attention equals plain attention over KV heads repeated per query head."""
    from benchmarks import kernel_cost as kc

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cpu, f32 = torch.device("cpu"), torch.float32
    s, g, c = kc.Shape(32, 1, 4, 2, 64, 128), 2, 6
    lay = kc._Layer(s, 1, c + g + 1, cpu, f32)
    pos = list(range(c, c + g + 1)) + [c + i + 1 + j for i in range(g + 1) for j in range(g)]
    anchors = list(range(g + 1)) + [i for i in range(g + 1) for _ in range(g)]
    x = torch.randn(1, len(pos), s.hidden)
    wide = kc.Shape(32, 1, 4, 4, 64, 128)  # the same layer with every KV head repeated
    ref = kc._Layer(wide, 1, c + g + 1, cpu, f32)
    q, k, v = lay.qkv.split([s.heads * s.hd, s.kv_heads * s.hd, s.kv_heads * s.hd])
    rep = lambda t: t.view(s.kv_heads, s.hd, -1).repeat_interleave(2, 0).flatten(0, 1)  # noqa: E731
    ref.qkv, ref.o, ref.gate_up, ref.down = torch.cat([q, rep(k), rep(v)]), lay.o, lay.gate_up, lay.down
    ref.k, ref.v = lay.k.repeat_interleave(2, 1), lay.v.repeat_interleave(2, 1)
    torch.testing.assert_close(kc._layer(ref, wide, x, kc._rows(pos, anchors, g + 1, c, s.hd, cpu, f32), c),
                               kc._layer(lay, s, x, kc._rows(pos, anchors, g + 1, c, s.hd, cpu, f32, 2), c))
    verified = kc._rows(list(range(c, c + g + 1)), list(range(g + 1)), g + 1, c, s.hd, cpu, f32, 2)
    both = kc._layer(lay, s, x, kc._rows(pos, anchors, g + 1, c, s.hd, cpu, f32, 2), c)
    alone = kc._layer(lay, s, x[:, :g + 1], verified, c)
    torch.testing.assert_close(both[:, :g + 1], alone)
    for anchor in range(g + 1):  # its stream 1 sees the cache and verified rows 0..anchor
        r = g + 1 + anchor * g + 1
        one = kc._rows([pos[r]], [0], 0, c + anchor + 1, s.hd, cpu, f32, 2)
        torch.testing.assert_close(both[:, r:r + 1],
                                   kc._layer(lay, s, x[:, r:r + 1], one, c + anchor + 1))
