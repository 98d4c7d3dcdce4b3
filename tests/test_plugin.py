"""Plugin registration: idempotent, patch discipline, and Ray worker processes."""
from __future__ import annotations

import pytest

from specstream_vllm.vllm_integration.patching import Patch, PatchError


def test_register_is_idempotent():
    from vllm.config.speculative import SpeculativeConfig
    from specstream_vllm.plugin import register
    register()
    first = SpeculativeConfig.__post_init__
    register()
    register()
    assert SpeculativeConfig.__post_init__ is first


def test_models_registered():
    from vllm import ModelRegistry
    from specstream_vllm.plugin import register
    register()
    archs = set(ModelRegistry.get_supported_archs())
    assert {"SpecStreamLlamaForCausalLM", "SpecStreamMistralForCausalLM",
            "SpecStreamQwen2ForCausalLM"} <= archs


def test_runner_patched_when_imported():
    from specstream_vllm.plugin import register
    register()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from specstream_vllm.vllm_integration.patches.runner import GPUModelRunnerPatch
    assert GPUModelRunner.propose_draft_token_ids is GPUModelRunnerPatch.__dict__["propose_draft_token_ids"]
    original = GPUModelRunnerPatch.original("propose_draft_token_ids")
    assert (original.__module__, original.__qualname__) == (
        "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.propose_draft_token_ids")


def test_patch_keeps_originals_and_refuses_double_apply():
    class Target:
        def f(self):
            return "orig"

    class P(Patch):
        target = Target

        def f(self):
            return "patched+" + P.original("f")(self)

    P.apply()
    assert Target().f() == "patched+orig"
    with pytest.raises(PatchError):
        P.apply()
    assert P.apply_once() is False
    P.remove()
    assert Target().f() == "orig"


def test_plugin_loads_in_ray_worker():
    """vLLM's Ray workers call load_general_plugins(); ours must register there."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        @ray.remote
        def worker_side():
            import os
            from vllm.plugins import load_general_plugins
            load_general_plugins()
            from vllm.config.speculative import SpeculativeConfig
            from specstream_vllm.plugin import is_registered
            return os.getpid(), is_registered(), SpeculativeConfig.__post_init__.__qualname__

        pid, registered, post_init = ray.get(worker_side.remote(), timeout=300)
        import os
        assert pid != os.getpid()
        assert registered and post_init.startswith("SpeculativeConfigPatch")
    finally:
        ray.shutdown()


def test_every_vllm_symbol_the_patches_need_exists():
    """The audit a new vLLM version gets before the pin moves."""
    from specstream_vllm.vllm_integration import patches
    needed = patches.required_vllm_symbols()
    assert "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model" in needed["runner"]
    assert patches.missing_vllm_symbols() == []


def test_each_vllm_attribute_is_patched_once():
    from specstream_vllm.vllm_integration import patches
    seen: dict[str, str] = {}
    for module in patches.patch_modules():
        for patch in patches.patches_of(module):
            for attr in patch.replaced():
                key = f"{patch.target_name}.{attr}"
                assert key not in seen, f"{key} patched by {seen[key]} and {patch.__name__}"
                seen[key] = patch.__name__
    assert len(seen) > 20


def test_version_gate_override_is_read_through_envs(monkeypatch):
    from specstream_vllm.errors import VersionMismatchError
    from specstream_vllm.vllm_integration import patches
    monkeypatch.setattr(patches, "installed_vllm_version", lambda: "0.33.1")
    monkeypatch.delenv(patches.VERSION_OVERRIDE_ENV, raising=False)
    with pytest.raises(VersionMismatchError, match=patches.VERSION_OVERRIDE_ENV):
        patches.apply_all()
    monkeypatch.setenv(patches.VERSION_OVERRIDE_ENV, "1")
    assert patches.check_vllm_version() == "0.33.1"


def _imports(path, package: str) -> set[str]:
    """Modules of this project that ``path`` imports (any level, function bodies too)."""
    import ast
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_import_cycles():
    """Between the modules of specstream_vllm and model_patches (every import, also the
    deferred ones inside functions: a deferred cycle is still a cycle of dependencies)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    modules = {}
    for top in ("specstream_vllm", "model_patches"):
        for f in (root / top).rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_pkg else parts)
            modules[name] = (f, name if is_pkg else name.rpartition(".")[0])
    graph = {name: sorted(m for m in _imports(f, pkg) if m in modules and m != name)
             for name, (f, pkg) in modules.items()}
    # a package importing its own submodules is how packages work, not a cycle
    graph = {n: [m for m in deps if not n.startswith(m + ".")] for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_patches_wait_for_their_module_and_share_it(tmp_path, monkeypatch):
    """Two patches on classes of one module not yet imported: both apply at its import."""
    (tmp_path / "late_module_for_patch_test.py").write_text(
        "class A:\n    def f(self):\n        return 'a'\n\n"
        "class B:\n    def g(self):\n        return 'b'\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class PA(Patch):
        target_name = "late_module_for_patch_test:A"

        def f(self):
            return "patched " + PA.original("f")(self)

    class PB(Patch):
        target_name = "late_module_for_patch_test:B"

        def g(self):
            return "patched " + PB.original("g")(self)

    PA.apply_when_imported()
    PB.apply_when_imported()
    assert not PA._applied and not PB._applied
    import late_module_for_patch_test as late
    assert (late.A().f(), late.B().g()) == ("patched a", "patched b")
