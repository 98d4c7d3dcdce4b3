"""vLLM general-plugin entry point (group ``vllm.general_plugins``).

vLLM calls ``register()`` in every process it starts (front end, engine core,
workers, Ray workers), possibly several times: it must be idempotent and cheap,
and it changes nothing for models or methods that do not use ``specstream``, except
that on CPU it repairs vLLM-CPU kernel overrides that return wrong values
(``vllm_integration/patches/kernels.py``; they affect vLLM's own methods too).
"""
from __future__ import annotations

import logging
import os

from . import envs

logger = logging.getLogger("specstream_vllm")
_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    if envs.get("SPECSTREAM_DISABLE_PLUGIN"):
        return
    from .vllm_integration import patches

    patches.apply_all()
    _REGISTERED = True
    logger.debug("specstream plugin registered (pid %s)", os.getpid())


def is_registered() -> bool:
    return _REGISTERED
