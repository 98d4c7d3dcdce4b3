"""The ``specstream`` speculative config's own keys: one typed model, the environment's
overrides of it, the check of the optional packages it needs, and the configuration
reference rendered from it.

One model serves every way in: the speculative config (``vllm serve
--speculative-config`` / ``LLM(speculative_config=...)``, validated in the front end by
vllm_integration/config.py), ``SpeculativeEngine(...)`` and ``DeploymentConfig(...)``.
Plain pydantic, no vLLM or torch, so the API and ``python -m specstream_vllm.options
--markdown`` stay cheap.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path
from typing import Callable, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import envs
from .errors import ConfigError

METHOD = "specstream"
#: the match source when neither the speculative config nor the checkpoint names one
DEFAULT_MATCH = "suffix"
#: default longest suffix-match draft when ``match_tokens`` is not given: suffix trees
#: often hold long continuations, and at batch 1 drafting up to 8 matched tokens (streams
#: still 4) was ahead of 4 on code and chat in the same run (docs/match-source.md)
SUFFIX_MATCH_TOKENS = 8
#: what a match source needs beyond vLLM: (module imported in the workers, pip package)
MATCH_DEPENDENCIES = {"suffix": ("arctic_inference.suffix_decoding", "arctic-inference")}


def _shown(default: str) -> dict:
    """The default as the reference shows it, where it depends on something else."""
    return {"shown_default": default}


class SpecStreamOptions(BaseModel):
    """Our keys of a ``"method": "specstream"`` speculative config (vLLM's own
    ``SpeculativeConfig`` does not know them; the plugin takes them out before vLLM
    validates the rest). ``None``: not given, the documented default applies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    draft_policy: Optional[Literal["auto", "fixed"]] = Field(
        None, json_schema_extra=_shown("`auto`; `fixed` when `min_draft_prob` is given"),
        description="How each request's draft length is chosen: `auto` picks, per request "
                    "and step, the length that maximises expected tokens per second (none "
                    "when speculation cannot pay); `fixed` drafts every stream, cut at "
                    "`min_draft_prob`.")
    min_draft_prob: Optional[float] = Field(
        None, ge=0.0, lt=1.0, strict=True, json_schema_extra=_shown("the checkpoint's"),
        description="Cut each draft at the first stream whose top-1 probability is below "
                    "this (0 drafts every stream): the `fixed` policy's cut, and `auto`'s "
                    "until step costs are measured.")
    match: Optional[Literal["suffix", "ngram", "none"]] = Field(
        None, json_schema_extra=_shown(f"the checkpoint's, else `{DEFAULT_MATCH}`"),
        description="Second draft source beside the streams, matches in the request's own "
                    "text: `suffix` (arctic-inference's suffix trees over the prompt and "
                    "earlier responses; `pip install arctic-inference`), `ngram` (vLLM's "
                    "prompt lookup) or `none`.")
    match_tokens: Optional[int] = Field(
        None, ge=1, le=64, strict=True,
        json_schema_extra=_shown(f"`num_speculative_tokens`; for `suffix` at least {SUFFIX_MATCH_TOKENS}"),
        description="Longest match draft; above `num_speculative_tokens` it widens vLLM's "
                    "verification for match drafts only.")
    draft_precision: Literal["auto", "exact", "bfloat16", "int8"] = Field(
        "auto",
        description="Weights of the stream pass: `exact` (the served model's own, the stream "
                    "LoRA beside them), `auto` (on a CPU, a oneDNN copy of each stream-layer "
                    "linear and of the draft head with the LoRA merged in: int8 where the CPU "
                    "has native int8 dot products (VNNI, AMX), else bf16 where it has native "
                    "bf16 ones or bf16 is served, else the served dtype; costs the stream "
                    "layers' weights once more in memory, skipped where that is over a "
                    "quarter of the memory available; exact elsewhere), `int8` or `bfloat16` "
                    "(those copies in that type on any CPU). Copies may "
                    "change drafts in near-ties, never the output.")
    draft_pass: Literal["separate", "fused", "auto"] = Field(
        "auto",
        description="Where the streams run, for checkpoints of the `anchor` form (their "
                    "streams attend to the main keys up to the anchor only): `separate` (a "
                    "pass over the top N_s layers after each verification), `fused` (stream "
                    "rows for every verified position ride inside the verification forward, "
                    "the layers' weights read once; that forward runs eagerly, Llama family "
                    "only, served weights whatever `draft_precision`) or `auto` (per "
                    "batch-size bucket, the pass measured cheaper). Other forms always run "
                    "`separate`; `fused` with them is a start-up error.")

    def speculative_keys(self) -> dict:
        """Our keys as they go into a speculative config: the ones given, nothing else."""
        return self.model_dump(include=set(SpecStreamOptions.model_fields),
                               exclude_unset=True, exclude_none=True)


#: our keys, in the order of the model
OPTION_KEYS = tuple(SpecStreamOptions.model_fields)

#: the environment variable (envs.REGISTRY) that overrides each key
ENV_OVERRIDES = {
    "draft_policy": "SPECSTREAM_DRAFT_POLICY",
    "min_draft_prob": "SPECSTREAM_MIN_DRAFT_PROB",
    "match": "SPECSTREAM_MATCH",
    "draft_precision": "SPECSTREAM_DRAFT_PRECISION",
}


class VllmSpeculativeKeys(BaseModel):
    """vLLM's own speculative-config keys as the ``specstream`` method reads them
    (documentation, and the defaults of the match source's knobs)."""

    method: Literal["specstream"] = Field(
        ..., description="Selects Speculative Streaming (the plugin registers the name).")
    model: Optional[str] = Field(
        None, json_schema_extra=_shown("the served model's `specstream/` folder"),
        description="Stream checkpoint directory trained for the served model.")
    num_speculative_tokens: Optional[int] = Field(
        None, ge=1, json_schema_extra=_shown("the checkpoint's `num_streams`"),
        description="Tokens the streams draft per step (γ), at most the checkpoint's "
                    "`num_streams`.")
    suffix_decoding_max_tree_depth: int = Field(
        24, ge=1, description="`match: suffix`: depth of the suffix trees (matched prefix "
                              "plus draft).")
    suffix_decoding_max_cached_requests: int = Field(
        10000, ge=0, description="`match: suffix`: earlier responses kept in the global tree "
                                 "(0: the request's own prompt only).")
    suffix_decoding_max_spec_factor: float = Field(
        1.0, ge=0.0, description="`match: suffix`: a draft is at most this many times the "
                                 "matched length.")
    suffix_decoding_min_token_prob: float = Field(
        0.1, ge=0.0, le=1.0, description="`match: suffix`: drafts stop at a token whose "
                                         "frequency-estimated probability is below this.")
    prompt_lookup_min: int = Field(
        2, ge=1, description="`match: ngram`: shortest n-gram looked up (one of the two "
                             "given sets both).")
    prompt_lookup_max: int = Field(
        5, ge=1, description="`match: ngram`: longest n-gram looked up.")


# --------------------------------------------------------------------------- validation

def parse_options(values: dict, label: Callable[[str, object], str]) -> SpecStreamOptions:
    """``values`` as options, or a one-line :class:`ConfigError`; ``label(key, value)``
    names where the offending value came from."""
    try:
        return SpecStreamOptions(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{label(key, err['input'])}: unknown specstream option; known: "
                              f"{', '.join(OPTION_KEYS)}") from None
        raise ConfigError(f"{label(key, err['input'])}: {err['msg']}") from None


def config_label(key: str, value) -> str:
    """Names a key of the speculative config (and the variable that overrides it)."""
    env = ENV_OVERRIDES.get(key)
    return f"speculative config \"{key}\"={value!r}" + (f" ({env} overrides it)" if env else "")


def with_env_overrides(options: SpecStreamOptions) -> SpecStreamOptions:
    """``options`` with the environment's overrides (ENV_OVERRIDES), read now: the one
    place the speculative config's environment variables are read."""
    update = {}
    for key, name in ENV_OVERRIDES.items():
        if not envs.is_set(name):
            continue
        try:
            value = envs.get(name)
        except ValueError as exc:  # the registry's own parser refused it
            raise ConfigError(str(exc)) from None
        update[key] = getattr(parse_options({key: value}, lambda _k, v, n=name: f"{n}={v!r}"), key)
    return options.model_copy(update=update) if update else options


def resolve_options(keys: Union[dict, SpecStreamOptions, None]) -> SpecStreamOptions:
    """The options in effect: the speculative config's keys of ours (a dict, or options
    already built) under the environment's overrides."""
    if not isinstance(keys, SpecStreamOptions):
        keys = parse_options(dict(keys or {}), config_label)
    return with_env_overrides(keys)


def match_source(options: SpecStreamOptions, checkpoint_match: Optional[str]) -> str:
    """The match source in effect: the options' ``match`` (environment included) > the
    checkpoint's > DEFAULT_MATCH. Its package must import here, in the front end, before
    any worker starts (the workers would fail later, one trace each)."""
    source = options.match or checkpoint_match or DEFAULT_MATCH
    if source not in MATCH_DEPENDENCIES:
        return source
    module, pip = MATCH_DEPENDENCIES[source]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        default = " (the default)" if options.match is None and checkpoint_match is None else ""
        raise ConfigError(
            f"match source \"{source}\"{default} needs {pip} ({exc.name or module} cannot be "
            f"imported): pip install {pip}, or choose \"match\": \"ngram\" or \"none\" in the "
            f"speculative config (or {ENV_OVERRIDES['match']}=none)") from None
    return source


# --------------------------------------------------------------------------- reference

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_text(annotation) -> str:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return " | ".join(f"`{a}`" for a in get_args(annotation))
    if args and get_origin(annotation) in (Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _range_text(field) -> str:
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata
              if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}  # annotated_types' bounds
    lo = ("[", bounds["Ge"]) if "Ge" in bounds else ("(", bounds["Gt"]) if "Gt" in bounds else None
    hi = ("]", bounds["Le"]) if "Le" in bounds else (")", bounds["Lt"]) if "Lt" in bounds else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return ""


def _default_text(field) -> str:
    extra = field.json_schema_extra or {}
    if "shown_default" in extra:
        return extra["shown_default"]
    if field.is_required():
        return "required"
    return f"`{field.default}`"


def _key_rows(model: type[BaseModel], names) -> list[str]:
    fields = model.model_fields
    return [f"| `{name}` | {_cell(_type_text(fields[name].annotation) + _range_text(fields[name]))} | "
            f"{_cell(_default_text(fields[name]))} | {_cell(fields[name].description or '')} |"
            for name in names]


def _env_table(variables: list) -> list[str]:
    rows = ["| variable | meaning |", "|---|---|"]
    rows += [f"| `{v.name}` | {_cell(v.help)} |" for v in variables]
    return rows


#: vLLM's keys shown before ours (the rest, the match source's knobs, after)
_VLLM_FIRST = ("method", "model", "num_speculative_tokens")


def render_reference() -> str:
    """The configuration reference (markdown) from the models above and envs.REGISTRY:
    the speculative config's keys (vLLM's that specstream reads, and ours), then the
    environment variables."""
    vllm_rest = [k for k in VllmSpeculativeKeys.model_fields if k not in _VLLM_FIRST]
    lines = [
        "| key | type | default | meaning |",
        "|---|---|---|---|",
        *_key_rows(VllmSpeculativeKeys, _VLLM_FIRST),
        *_key_rows(SpecStreamOptions, OPTION_KEYS),
        *_key_rows(VllmSpeculativeKeys, vllm_rest),
        "",
        "Our keys (`draft_policy` to `draft_precision`) are also arguments of "
        "`SpeculativeEngine` and fields of `DeploymentConfig`. Environment variables:",
        "",
        *_env_table(envs.user_variables()),
        "",
        "Debugging and measurement switches:",
        "",
        *_env_table(envs.debug_variables()),
    ]
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    """The text between the README's markers (ValueError when they are missing)."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"no {START_MARKER} ... {END_MARKER} block")
    return text[start + len(START_MARKER):end].strip("\n") + "\n"


def update_readme(path: Path) -> bool:
    """Replace the README's block with the rendered reference; True when it changed."""
    text = path.read_text()
    readme_block(text)  # markers present
    start = text.index(START_MARKER) + len(START_MARKER)
    new = text[:start] + "\n" + render_reference() + text[text.index(END_MARKER):]
    if new != text:
        path.write_text(new)
    return new != text


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m specstream_vllm.options",
                                description="The configuration reference (speculative-config "
                                            "keys, environment variables).")
    p.add_argument("--markdown", action="store_true", help="print it as markdown")
    p.add_argument("--update-readme", metavar="README", type=Path,
                   help=f"rewrite the block between {START_MARKER} and {END_MARKER}")
    args = p.parse_args(argv)
    if args.update_readme:
        changed = update_readme(args.update_readme)
        print(f"{args.update_readme}: {'updated' if changed else 'already current'}")
        return 0
    sys.stdout.write(render_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
