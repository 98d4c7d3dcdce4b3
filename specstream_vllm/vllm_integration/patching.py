"""A tiny, explicit monkey-patching framework.

Each patch is a class that names its target class; its public methods and
properties replace the target's attributes of the same name. Originals are kept
(``Patch.original(name)``), applying twice is refused, and ``remove()`` restores.
The vLLM plugin hook may run several times per process, so ``apply_once`` is the
idempotent entry point. :func:`when_imported` defers a patch until its target's
module is first imported (vLLM's heavy modules stay unloaded where unused).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any, Callable, ClassVar

_SKIP = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "target",
         "_originals", "_applied", "target_name", "__annotations__", "__firstlineno__", "__static_attributes__"}
_MISSING = object()


class PatchError(RuntimeError):
    pass


def resolve(symbol: str) -> Any:
    """``"package.module:Name.attr"`` -> the object (imports the module)."""
    module, _, qualname = symbol.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return obj


class Patch:
    """Subclass with ``target_name = "vllm.module:Class"`` and define the replacement
    attributes (``target`` is resolved from it when the patch is applied)."""

    target_name: ClassVar[str]
    target: ClassVar[type | None] = None
    _originals: ClassVar[dict[str, Any]]
    _applied: ClassVar[bool] = False

    @classmethod
    def _members(cls) -> dict[str, Any]:
        return {k: v for k, v in vars(cls).items()
                if k not in _SKIP and not k.startswith("_abc")}

    @classmethod
    def replaced(cls) -> list[str]:
        """The target attributes this patch replaces."""
        return sorted(cls._members())

    @classmethod
    def _target(cls) -> type:
        if cls.target is None:
            cls.target = resolve(cls.target_name)
        return cls.target

    @classmethod
    def apply(cls) -> None:
        target = cls._target()
        if cls._applied or getattr(target, f"_specstream_patched_by_{cls.__name__}", False):
            raise PatchError(f"{cls.__name__} is already applied to {target.__qualname__}")
        cls._originals = {}
        for name, value in cls._members().items():
            cls._originals[name] = target.__dict__.get(name, _MISSING)
            setattr(target, name, value)
        setattr(target, f"_specstream_patched_by_{cls.__name__}", True)
        cls._applied = True

    @classmethod
    def apply_once(cls) -> bool:
        if cls._applied or getattr(cls._target(), f"_specstream_patched_by_{cls.__name__}", False):
            return False
        cls.apply()
        return True

    @classmethod
    def apply_when_imported(cls) -> None:
        """``apply_once`` as soon as the target's module is imported."""
        when_imported(cls.target_name.partition(":")[0], cls.apply_once)

    @classmethod
    def remove(cls) -> None:
        if not cls._applied:
            return
        for name, orig in cls._originals.items():
            if orig is _MISSING:
                delattr(cls.target, name)
            else:
                setattr(cls.target, name, orig)
        delattr(cls.target, f"_specstream_patched_by_{cls.__name__}")
        cls._applied = False

    @classmethod
    def original(cls, name: str) -> Any:
        """The target's attribute as it was before this patch (unbound)."""
        orig = cls._originals.get(name, _MISSING)
        if orig is _MISSING:
            # inherited from a base class: look it up past the target's own dict
            for base in cls.target.__mro__[1:]:
                if name in base.__dict__:
                    return base.__dict__[name]
            raise PatchError(f"{cls.target.__qualname__} had no attribute {name!r}")
        return orig


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run callbacks right after one module is first imported."""

    def __init__(self, name: str):
        self.name = name
        self.callbacks: list[Callable[[], None]] = []

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, callbacks = spec.loader, self.callbacks

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                for callback in callbacks:
                    callback()

        spec.loader = _Loader()
        return spec


def when_imported(module: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` now if ``module`` is loaded, else right after its first import
    (callbacks on one module run in the order they were registered)."""
    if module in sys.modules:
        callback()
        return
    finder = next((f for f in sys.meta_path if isinstance(f, _AfterImport) and f.name == module),
                  None)
    if finder is None:
        finder = _AfterImport(module)
        sys.meta_path.insert(0, finder)
    if callback not in finder.callbacks:
        finder.callbacks.append(callback)
