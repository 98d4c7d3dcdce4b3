"""The README is a user's first contact: its commands must parse, name files that exist and
environment variables the code reads; and the user-facing text speaks of the product only."""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from specstream_vllm import envs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 350

#: top-level folders whose paths a README command may name (relative to the checkout)
_REPO_DIRS = ("scripts", "configs", "specstream_vllm", "docs", "examples", "tests", "benchmarks",
              "model_patches")
_PATH = re.compile(r"(?<![\w/.-])((?:%s)/[\w./-]*[\w/])" % "|".join(_REPO_DIRS))
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_ENV = re.compile(r"\bSPECSTREAM_[A-Z0-9_]+\b")


def _blocks(text: str, *langs: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang in langs]


def test_readme_length() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines; keep it at most {MAX_LINES} (move detail to docs/)"


def test_readme_python_blocks_parse() -> None:
    blocks = _blocks(README.read_text(), "python")
    assert blocks, "README.md has no ```python blocks"
    for body in blocks:
        try:
            ast.parse(body)
        except SyntaxError as e:
            pytest.fail(f"README python block does not parse ({e}):\n{body}")


def test_readme_shell_blocks_parse() -> None:
    blocks = _blocks(README.read_text(), "bash", "sh", "shell")
    assert blocks, "README.md has no ```bash blocks"
    for body in blocks:
        r = subprocess.run(["bash", "-n"], input=body, text=True, capture_output=True)
        assert r.returncode == 0, f"README shell block does not parse: {r.stderr}\n{body}"


def _specstream_commands(text: str) -> list[list[str]]:
    """Every ``specstream ...`` command line of the README's shell blocks, as argv."""
    out = []
    for body in _blocks(text, "bash", "sh", "shell"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("specstream "):
                line = re.sub(r'"?\$\{?(\w+)\}?"?', r"/placeholder/\1", line)
                out.append(shlex.split(line)[1:])
    return out


def test_readme_specstream_commands_match_the_cli(capsys) -> None:
    """Flags the README shows must be flags the CLI takes (parsed, not run)."""
    from specstream_vllm.cli import build_parser

    commands = _specstream_commands(README.read_text())
    assert len(commands) >= 3, "expected the README's train/data/eval commands"
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"`specstream {' '.join(argv)}` is refused by the CLI: "
                        f"{capsys.readouterr().err.strip()}")


@pytest.mark.slow
def test_readme_verify_step_runs_as_written(tmp_path) -> None:
    """The install check is the one command a new user runs before any engine: run it."""
    text = README.read_text()
    verify = text[text.index("**Verify**"):]
    body = _blocks(verify, "bash")[0]
    shown = re.search(r"prints `([^`]+)`", verify).group(1)
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-c", body], cwd=tmp_path, env=env, text=True,
                       capture_output=True, timeout=300)
    assert r.returncode == 0, f"README's verify step failed:\n{r.stderr[-2000:]}"
    assert r.stdout.strip().splitlines()[-1] == shown, (
        f"README says the verify step prints {shown!r}; it printed {r.stdout.strip()!r}")


def test_readme_names_existing_paths() -> None:
    text = README.read_text()
    named = set()
    for body in _blocks(text, "bash", "sh", "shell", "python"):
        named.update(_PATH.findall(body))
    named.update(m for m in _LINK.findall(text) if "://" not in m)
    assert named, "no repository paths found in README.md (the extraction is broken)"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README.md names paths that do not exist in the checkout: {missing}"


def test_docs_links_resolve() -> None:
    broken = []
    for page in [ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in _LINK.findall(page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, f"links to files that do not exist: {broken}"


def test_readme_environment_variables_are_registered() -> None:
    named = set(_ENV.findall(README.read_text()))
    unknown = sorted(named - set(envs.REGISTRY))
    assert not unknown, (f"README.md names {unknown}, which specstream_vllm/envs.py does not "
                         "register: add them to its _VARS or fix the README")


# --------------------------------------------------------------------------- product words

#: every text file of the repository (code, tests, docs, recipes, shipped checkpoints); this
#: file holds the patterns themselves and is left out
_TEXT_SUFFIXES = (".md", ".yaml", ".yml", ".json", ".jsonl", ".py", ".txt", ".toml", ".sh", "")
_WORD = "sess" + "ion"  # spelled in two parts so that a grep of the repository stays clean
_DEVELOPMENT_WORDS = re.compile(
    rf"\b{_WORD}s?\b|\bissues?\s*#?\d|\bs1\d[a-c]?\b|\blast time\b|\bnext time\b", re.I)
#: the word where it is the product's own meaning (an HTTP client's, a child process's)
_PRODUCT_WORD = re.compile(rf"\b(?:http|client|aiohttp|requests)\s+{_WORD}\b|start_new_{_WORD}"
                           rf"|new {_WORD}|scope=.{_WORD}.|async with {_WORD}|\({_WORD},", re.I)


def _user_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else [
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".git" not in p.parts]
    for name in sorted(names):
        f = ROOT / name
        if f.is_file() and f.suffix in _TEXT_SUFFIXES and f.resolve() != Path(__file__).resolve():
            yield f


def _development_words(text: str) -> list[str]:
    hits = []
    for line in text.splitlines():
        cleaned = _PRODUCT_WORD.sub("", line)
        if _DEVELOPMENT_WORDS.search(cleaned):
            hits.append(line.strip()[:160])
    return hits


def test_user_text_speaks_of_the_product_only() -> None:
    found = {}
    for f in _user_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        hits = _development_words(text)
        if hits:
            found[str(f.relative_to(ROOT))] = hits[:3]
    assert not found, ("the repository speaks of how the project was made (work periods, ticket "
                       f"numbers, sequence names); say what the product does instead: {found}")


def test_development_word_check_catches_history() -> None:
    assert _development_words(f"Measured in the fifteenth {_WORD}")
    assert _development_words("see docs/benchmarks/next12" + "-s" + "15")
    assert _development_words("fixes " + "issue " + "12")
    assert not _development_words(f"an aiohttp client {_WORD} per benchmark client")


def test_benchmark_result_folders_are_named_by_date_and_measurement() -> None:
    bench = ROOT / "docs" / "benchmarks"
    bad = [p.name for p in bench.iterdir()
           if p.is_dir() and not re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9][a-z0-9-]*", p.name)]
    assert not bad, f"docs/benchmarks folders must be named <date>-<what was measured>: {bad}"
