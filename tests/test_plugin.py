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
    from specstream_vllm.vllm_integration.compat import GPUModelRunnerPatch
    assert GPUModelRunner.propose_draft_token_ids is GPUModelRunnerPatch.__dict__["propose_draft_token_ids"]
    assert GPUModelRunnerPatch.original("propose_draft_token_ids") is not None


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
