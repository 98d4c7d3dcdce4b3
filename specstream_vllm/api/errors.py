"""Errors of the Python API (all subclasses of :class:`specstream_vllm.errors.SpecStreamError`)."""
from __future__ import annotations

from ..errors import ConfigError, SpecStreamError

#: Parameters of the original SpecStream package that vLLM cannot honour.
TREE_PARAMETERS = ("tree_depth", "tree_width", "tree_top_k", "top_k_tree", "num_tree_paths",
                   "early_exit", "early_exit_layer")


#: Sampling parameters vLLM 0.32 refuses with every speculative method (the server answers 400).
SPEC_DECODE_REFUSED_SAMPLING = ("min_p", "logit_bias")


class SamplingParameterNotSupportedError(ConfigError):
    """A sampling parameter that vLLM refuses whenever speculative decoding is on."""


class TreeDraftingNotSupportedError(SpecStreamError, NotImplementedError):
    """Tree drafting / early exit was requested; vLLM verifies a single chain of γ drafts."""


class DeviceError(ConfigError):
    """The requested device is not available with the installed vLLM build / hardware."""


class StreamsNotFoundError(ConfigError):
    """No stream checkpoint was given and none is known for the model."""


class EngineClosedError(SpecStreamError, RuntimeError):
    """The engine was shut down."""


class TrainingNotDoneError(SpecStreamError, RuntimeError):
    """An adapter method needs a finished :meth:`LoRAAdapter.train` (or :meth:`load_weights`)."""


def reject_tree_parameters(params: dict, where: str) -> None:
    """Raise for SpecStream-package parameters that would otherwise be silently ignored.

    ``early_exit=False`` / ``None`` and ``tree_* = None`` mean "off" and are accepted.
    """
    bad = {k: v for k, v in params.items()
           if k in TREE_PARAMETERS and v is not None and v is not False}
    if bad:
        raise TreeDraftingNotSupportedError(
            f"{where}: {', '.join(f'{k}={v!r}' for k, v in bad.items())} is not supported: "
            "tree drafting (tree_depth / tree_width / top-k tree paths) and early exit are not "
            "supported yet by the vLLM specstream method, which drafts one chain of `gamma` tokens "
            "per step and verifies it with vLLM's rejection sampler. Remove these arguments and "
            "tune `gamma` (2..8, <= the checkpoint's num_streams) instead.")


def reject_refused_sampling(params: dict, where: str) -> None:
    """Raise for ``min_p`` / ``logit_bias`` before vLLM does (it refuses them per request with
    any speculative method); the API has no such parameters, so any value but None is refused."""
    bad = {k: params[k] for k in SPEC_DECODE_REFUSED_SAMPLING if params.get(k) is not None}
    if bad:
        raise SamplingParameterNotSupportedError(
            f"{where}: {', '.join(f'{k}={v!r}' for k, v in bad.items())} is not supported: vLLM "
            "refuses min_p and logit_bias with every speculative decoding method (specstream, "
            "ngram, EAGLE, ...; a server answers 400). Remove them (top_p / top_k / temperature "
            "work), or send such requests to an engine without speculative decoding.")
