"""A tiny, explicit monkey-patching framework.

Each patch is a class that names its target class; its public methods and
properties replace the target's attributes of the same name. Originals are kept
(``Patch.original(name)``), applying twice is refused, and ``remove()`` restores.
The vLLM plugin hook may run several times per process, so ``apply_once`` is the
idempotent entry point.
"""
from __future__ import annotations

from typing import Any, ClassVar

_SKIP = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "target",
         "_originals", "_applied", "__annotations__", "__firstlineno__", "__static_attributes__"}
_MISSING = object()


class PatchError(RuntimeError):
    pass


class Patch:
    """Subclass with ``target = SomeClass`` and define the replacement attributes."""

    target: ClassVar[type]
    _originals: ClassVar[dict[str, Any]]
    _applied: ClassVar[bool] = False

    @classmethod
    def _members(cls) -> dict[str, Any]:
        return {k: v for k, v in vars(cls).items()
                if k not in _SKIP and not k.startswith("_abc")}

    @classmethod
    def apply(cls) -> None:
        if cls._applied or getattr(cls.target, f"_specstream_patched_by_{cls.__name__}", False):
            raise PatchError(f"{cls.__name__} is already applied to {cls.target.__qualname__}")
        cls._originals = {}
        for name, value in cls._members().items():
            cls._originals[name] = cls.target.__dict__.get(name, _MISSING)
            setattr(cls.target, name, value)
        setattr(cls.target, f"_specstream_patched_by_{cls.__name__}", True)
        cls._applied = True

    @classmethod
    def apply_once(cls) -> bool:
        if cls._applied or getattr(cls.target, f"_specstream_patched_by_{cls.__name__}", False):
            return False
        cls.apply()
        return True

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
