"""Error types: every failure a user can cause says what is wrong and how to fix it."""


class SpecStreamError(Exception):
    """Base class for errors caused by user input (configs, checkpoints, requests)."""


class CheckpointError(SpecStreamError, ValueError):
    """A stream checkpoint is missing, malformed, or made for something else."""


class BaseModelMismatchError(CheckpointError):
    """The checkpoint was trained for a different base model than the one served."""


class ConfigError(SpecStreamError, ValueError):
    """A speculative config or training recipe is invalid."""


class UnsupportedArchitectureError(SpecStreamError, ValueError):
    """The base model's architecture has no MSA implementation in model_patches/."""


class VersionMismatchError(SpecStreamError, RuntimeError):
    """The installed vLLM is not the version the integration layer is pinned to."""
