"""Packaging: the entry point, and imports from a built (non-editable) wheel."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_declared_and_importable():
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "specstream"]
    assert eps, "vllm.general_plugins entry point 'specstream' is not installed"
    fn = eps[0].load()
    from specstream_vllm.plugin import register
    assert fn is register


def test_console_script_declared():
    eps = [e for e in entry_points(group="console_scripts") if e.name == "specstream"]
    assert eps and eps[0].value == "specstream_vllm.cli:main"


def test_wheel_contents_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("specstream_vllm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "specstream_vllm/model_patches/__init__.py" in names
    assert "specstream_vllm/model_patches/llama_family.py" in names
    assert not any(n.startswith("model_patches/") for n in names), "generic top-level module shipped"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import specstream_vllm, specstream_vllm.model_patches as mp, specstream_vllm.plugin;"
            "from specstream_vllm.model_patches import msa;"
            "print(specstream_vllm.__file__); print(mp.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, text=True,
                         capture_output=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout
    assert all(line.startswith(str(site)) for line in out.split()), out
