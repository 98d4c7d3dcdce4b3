"""The configuration reference has one source: the README shows what the options model
and the environment registry render, and nothing reads an unregistered variable."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from specstream_vllm import envs
from specstream_vllm.options import (ENV_OVERRIDES, OPTION_KEYS, SpecStreamOptions,
                                     VllmSpeculativeKeys, readme_block, render_reference)

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("specstream_vllm", "model_patches", "benchmarks")


def test_readme_block_is_the_rendered_reference():
    block = readme_block((ROOT / "README.md").read_text())
    assert block == render_reference(), (
        "README.md's configuration reference is stale: run "
        "`python -m specstream_vllm.options --update-readme README.md`")


def test_markdown_command_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "specstream_vllm.options", "--markdown"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == render_reference()


def test_reference_lists_every_key_and_variable():
    text = render_reference()
    for key in (*VllmSpeculativeKeys.model_fields, *OPTION_KEYS):
        assert f"| `{key}` |" in text
    for var in envs.REGISTRY:
        assert f"| `{var}` |" in text
    for name, field in SpecStreamOptions.model_fields.items():
        assert field.description, f"option {name} has no description"


def test_every_override_is_a_registered_user_variable():
    for key, name in ENV_OVERRIDES.items():
        assert key in OPTION_KEYS
        assert envs.REGISTRY[name].kind == "user"


def test_every_specstream_variable_in_the_code_is_registered():
    pattern = re.compile(r"SPECSTREAM_[A-Z0-9_]*[A-Z0-9]")
    found: dict[str, set[str]] = {}
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            for name in pattern.findall(path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert found, "the scan found nothing: wrong folders?"
    missing = {name: sorted(paths) for name, paths in found.items() if name not in envs.REGISTRY}
    assert not missing, f"SPECSTREAM_* names not in specstream_vllm/envs.py: {missing}"


def test_documented_vllm_keys_are_vllms():
    """The vLLM keys the reference documents exist in vLLM's SpeculativeConfig, and where
    vLLM has a default of its own the reference shows that one."""
    from vllm.config.speculative import SpeculativeConfig
    fields = SpeculativeConfig.__dataclass_fields__
    for name, field in VllmSpeculativeKeys.model_fields.items():
        assert name in fields, f"{name} is not a vLLM speculative-config key"
        theirs = fields[name].default
        if name.startswith("suffix_decoding_"):
            assert field.default == theirs, (name, field.default, theirs)
