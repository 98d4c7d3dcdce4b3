"""``SpeculativeEngine``: one vLLM engine with the ``specstream`` method behind a small API.

    from specstream_vllm import SpeculativeEngine
    if __name__ == "__main__":              # vLLM on CPU spawns worker processes
        with SpeculativeEngine(gamma=4) as engine:
            print(engine.generate("The capital of France is").text)

Every figure it reports is measured: tokens/s from wall-clock time around the vLLM call,
acceptance from the difference of vLLM's own spec-decode counters before and after it.
"""
from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import ConfigError
from ..options import SpecStreamOptions, match_source, parse_options, resolve_options
from ._resolve import ResolvedSpec, check_device, check_dtype, resolve_spec
from .errors import EngineClosedError, reject_refused_sampling, reject_tree_parameters
from .results import (AcceptanceStats, BenchmarkResult, EngineMetrics, GenerationResult,
                      MemoryOverhead, read_spec_counters)

Message = dict
Prompt = Union[str, Sequence[Message]]
Prompts = Union[Prompt, Sequence[str], Sequence[Sequence[Message]]]

#: KV-cache size used on CPU when neither ``kv_cache_memory_bytes`` /
#: ``gpu_memory_utilization`` nor ``VLLM_CPU_KVCACHE_SPACE`` is given.
DEFAULT_CPU_KV_CACHE_GIB = 1


def _is_messages(x: Any) -> bool:
    return (isinstance(x, (list, tuple)) and len(x) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in x))


class SpeculativeEngine:
    """A vLLM engine serving ``model`` with Speculative Streaming drafts.

    Args:
        model: local HF model directory (or hub name); ``None`` = the embedded default
            SmolLM2-135M-Instruct.
        tokenizer: tokenizer path/name if it differs from ``model``.
        gamma: tokens drafted per step, 2..8 and at most the checkpoint's ``num_streams``.
        streams: stream checkpoint directory; ``None`` = the shipped checkpoint for the
            default model, or the ``specstream/`` folder of a fine-tuned model directory.
        temperature: default sampling temperature of :meth:`generate` (0 = greedy).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``; vLLM picks the device by its installed
            build, so a request that does not match it raises :class:`DeviceError`.
        dtype: ``"auto"``, ``"bfloat16"``, ``"float16"``, ``"float32"``. ``"auto"`` takes
            bfloat16 only on CPUs with AMX bf16 (float32 on others, where vLLM-CPU's
            compiled bf16 returns wrong text); on a GPU vLLM chooses.
        chat_template: how plain-string prompts are sent: ``"auto"`` (default) wraps each
            string as one user turn of the model's chat template when the tokenizer has
            one (instruct models answer instead of continuing the text); ``False`` sends
            strings as raw completion prompts. Chat messages always use the template.
        lazy: start the engine on first use instead of in the constructor.
        min_draft_prob, draft_policy, match, match_tokens, draft_precision, draft_pass: the
            speculative config's keys of the same names (specstream_vllm.options.
            SpecStreamOptions; README "Configuration reference"); ``None`` = the key's
            default. A match source whose package is missing (``"suffix"``, the default,
            needs arctic-inference) raises :class:`ConfigError` here.
        **engine_kwargs: passed to ``vllm.LLM`` (``max_model_len``, ``enforce_eager``,
            ``kv_cache_memory_bytes``, ``tensor_parallel_size``, ...).

    ``tree_depth`` / ``tree_width`` / ``early_exit`` (SpecStream package) raise
    :class:`TreeDraftingNotSupportedError`: vLLM verifies a single chain of drafts.
    ``min_p`` / ``logit_bias`` raise :class:`SamplingParameterNotSupportedError`: vLLM
    refuses them with any speculative method.
    """

    def __init__(self, model: Optional[str] = None, tokenizer: Optional[str] = None,
                 gamma: int = 4, streams: Optional[str] = None, temperature: float = 0.0,
                 device: str = "auto", dtype: str = "auto", *, chat_template: Union[bool, str] = "auto",
                 lazy: bool = False, min_draft_prob: Optional[float] = None,
                 draft_policy: Optional[str] = None, match: Optional[str] = None,
                 match_tokens: Optional[int] = None, draft_precision: Optional[str] = None,
                 draft_pass: Optional[str] = None, tree_depth: Optional[int] = None, tree_width: Optional[int] = None,
                 early_exit: Optional[bool] = None, **engine_kwargs: Any):
        reject_tree_parameters({"tree_depth": tree_depth, "tree_width": tree_width,
                                "early_exit": early_exit, **engine_kwargs}, "SpeculativeEngine")
        reject_refused_sampling(engine_kwargs, "SpeculativeEngine")
        if "speculative_config" in engine_kwargs:
            raise ConfigError("SpeculativeEngine builds the speculative_config itself; pass "
                              "gamma= and streams= instead of speculative_config=")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ConfigError(f"temperature must be a number >= 0, got {temperature!r}")
        self.dtype = check_dtype(dtype)
        check_device(device, probe_vllm=False)  # cheap checks first, before touching files
        given = {"min_draft_prob": min_draft_prob, "draft_policy": draft_policy, "match": match,
                 "match_tokens": match_tokens, "draft_precision": draft_precision,
                 "draft_pass": draft_pass}
        self.options: SpecStreamOptions = parse_options(
            {k: v for k, v in given.items() if v is not None},
            lambda key, value: f"SpeculativeEngine({key}={value!r})")
        self.spec: ResolvedSpec = resolve_spec(model, streams, gamma)
        self.device = check_device(device) if device != "auto" else device
        if chat_template not in ("auto", True, False):
            raise ConfigError(f"chat_template must be 'auto', True or False, got {chat_template!r}")
        self.chat_template = chat_template
        # a missing package of the match source: one line here, not a trace per worker
        match_source(resolve_options(self.options), self.spec.default_match)
        self.tokenizer_name = tokenizer
        self.temperature = float(temperature)
        self.engine_kwargs = dict(engine_kwargs)
        self._llm = None
        self._closed = False
        self._base_counters: Optional[dict] = None
        self._owner_base_rss = 0
        self._requests = 0
        self._tokens = 0
        self._seconds = 0.0
        if not lazy:
            self._start()

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def streams(self) -> Optional[str]:
        return self.spec.streams

    @property
    def gamma(self) -> int:
        return self.spec.gamma

    @property
    def resolved_dtype(self) -> str:
        """The dtype given to vLLM: on a CPU ``"auto"`` is float32 unless the dtype probe
        (run at the first start, or by `specstream check-dtype`) measured bfloat16 right and
        faster here (specstream_vllm/dtype_choice.py); vLLM's choice on a GPU. The choice and
        its reason are logged once."""
        from ..dtype_choice import announce, choose_dtype
        dtype, reason = choose_dtype(self.dtype, platform=self._platform(),
                                     enforce_eager=bool(self.engine_kwargs.get("enforce_eager")))
        announce(dtype, reason)
        return dtype

    @property
    def llm(self):
        """The underlying ``vllm.LLM`` (started on first access)."""
        return self._ensure()

    def llm_kwargs(self, speculative: bool = True) -> dict:
        """The exact keyword arguments given to ``vllm.LLM``."""
        kw = dict(model=self.spec.model, dtype=self.resolved_dtype, disable_log_stats=False)
        if self.tokenizer_name:
            kw["tokenizer"] = self.tokenizer_name
        kw.update(self.engine_kwargs)
        if ("kv_cache_memory_bytes" not in kw and "gpu_memory_utilization" not in kw
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE") and self._platform() == "cpu"):
            kw["kv_cache_memory_bytes"] = DEFAULT_CPU_KV_CACHE_GIB * 2 ** 30
        if speculative:
            kw["speculative_config"] = self.spec.speculative_config(self.options)
        return kw

    @staticmethod
    def _platform() -> str:
        from ._resolve import vllm_platform
        return vllm_platform()

    # ------------------------------------------------------------------ lifecycle
    def _start(self):
        if self._closed:
            raise EngineClosedError("this SpeculativeEngine was shut down; create a new one")
        from vllm import LLM  # import before measuring the owner's base RSS

        from ._memory import owner_rss
        kwargs = self.llm_kwargs()
        self._owner_base_rss = owner_rss()
        self._llm = LLM(**kwargs)
        self._base_counters = read_spec_counters(self._llm)
        return self._llm

    def _ensure(self):
        if self._closed:
            raise EngineClosedError("this SpeculativeEngine was shut down; create a new one")
        return self._llm if self._llm is not None else self._start()

    def shutdown(self) -> None:
        """Stop the engine and its worker processes (idempotent)."""
        llm, self._llm = self._llm, None
        self._closed = True
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already gone
            pass
        del llm
        gc.collect()

    close = shutdown

    def __enter__(self) -> "SpeculativeEngine":
        self._ensure()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._llm is not None else "not started")
        return (f"SpeculativeEngine(model={self.spec.model!r}, streams={self.spec.streams!r}, "
                f"gamma={self.gamma}, dtype={self.dtype!r}, {state})")

    # ------------------------------------------------------------------ prompts
    def get_tokenizer(self):
        return self._ensure().get_tokenizer()

    def _wrap_strings(self, override: Optional[bool]) -> bool:
        mode = self.chat_template if override is None else override
        if mode == "auto":
            return bool(getattr(self.get_tokenizer(), "chat_template", None))
        return bool(mode)

    def _normalize(self, prompts: Prompts, chat_template: Optional[bool] = None) -> tuple[list, bool]:
        """-> (vLLM prompts, batched). Strings become one user turn of the chat template
        (see ``chat_template``) or are sent raw; chat messages get the model's chat
        template with the generation prompt."""
        from vllm.inputs import TokensPrompt

        if isinstance(prompts, str):
            items, batched = [prompts], False
        elif _is_messages(prompts):
            items, batched = [list(prompts)], False
        elif isinstance(prompts, (list, tuple)) and prompts and all(
                isinstance(p, str) or _is_messages(p) for p in prompts):
            items, batched = list(prompts), True
        else:
            raise ConfigError(
                "prompts must be a string, a list of strings, a chat conversation (list of "
                "{'role': ..., 'content': ...} dicts) or a list of conversations; got "
                f"{type(prompts).__name__}{' (empty)' if not prompts else ''}")
        out = []
        tok = None
        wrap = any(isinstance(p, str) for p in items) and self._wrap_strings(chat_template)
        for p in items:
            if isinstance(p, str) and wrap:
                p = [{"role": "user", "content": p}]
            if isinstance(p, str):
                out.append(p)
            else:
                tok = tok or self.get_tokenizer()
                text = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                out.append(TokensPrompt(prompt_token_ids=tok(text, add_special_tokens=False).input_ids))
        return out, batched

    def _prompt_token_ids(self, prompts: Prompts, chat_template: Optional[bool] = None) -> list[list[int]]:
        items, _ = self._normalize(prompts, chat_template)
        tok = self.get_tokenizer()
        return [list(p["prompt_token_ids"]) if isinstance(p, dict) else list(tok(p).input_ids)
                for p in items]

    def _sampling(self, max_new_tokens: int, temperature: Optional[float], top_p: float,
                  top_k: Optional[int], seed: Optional[int], stop, ignore_eos: bool):
        from vllm import SamplingParams

        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        temp = self.temperature if temperature is None else temperature
        if temp < 0:
            raise ConfigError(f"temperature must be >= 0, got {temp}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        kw = dict(max_tokens=max_new_tokens, temperature=float(temp), top_p=float(top_p),
                  seed=seed, stop=stop, ignore_eos=ignore_eos)
        if top_k is not None:
            kw["top_k"] = int(top_k)
        return SamplingParams(**kw)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Prompts, max_new_tokens: int = 128, temperature: Optional[float] = None,
                 top_p: float = 1.0, top_k: Optional[int] = None, seed: Optional[int] = None,
                 stop: Optional[list[str]] = None, ignore_eos: bool = False,
                 chat_template: Optional[bool] = None, **kwargs: Any) -> GenerationResult:
        """Generate for a prompt, a list of prompts, a chat conversation or a list of them.

        Conversations (``[{"role": "user", "content": ...}]``) get the model's chat
        template; strings too unless ``chat_template=False`` (here or in the constructor).
        The result carries the texts, token ids, tokens/s of this call and the
        acceptance of this call (difference of vLLM's counters around it).
        """
        reject_tree_parameters(kwargs, "generate()")
        reject_refused_sampling(kwargs, "generate()")
        if kwargs:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(kwargs)}")
        llm = self._ensure()
        items, batched = self._normalize(prompts, chat_template)
        params = self._sampling(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos)
        before = read_spec_counters(llm)
        t0 = time.perf_counter()
        outs = llm.generate(items, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        after = read_spec_counters(llm)
        res = GenerationResult(
            texts=[o.outputs[0].text for o in outs],
            token_ids=[list(o.outputs[0].token_ids) for o in outs],
            prompt_token_ids=[list(o.prompt_token_ids or []) for o in outs],
            finish_reasons=[o.outputs[0].finish_reason for o in outs],
            seconds=seconds, acceptance=AcceptanceStats.delta(before, after), batched=batched)
        self._requests += len(outs)
        self._tokens += res.num_generated_tokens
        self._seconds += seconds
        return res

    def get_metrics(self) -> EngineMetrics:
        """Running totals since the engine started: vLLM's spec-decode counters (drafts,
        draft tokens, accepted, accepted per position) and the generated tokens and
        seconds of all :meth:`generate` calls (benchmark runs are not included)."""
        llm = self._ensure()
        return EngineMetrics(AcceptanceStats.delta(self._base_counters, read_spec_counters(llm)),
                             self._requests, self._tokens, self._seconds)

    # ------------------------------------------------------------------ benchmark
    def stream_parameter_bytes(self) -> int:
        """Bytes of the stream tensors at the serving dtype (from the checkpoint file)."""
        from safetensors import safe_open

        from ..checkpoint import WEIGHTS_NAME, resolve_checkpoint_dir
        ckpt = resolve_checkpoint_dir(self.spec.streams or self.spec.model)
        numel = 0
        with safe_open(str(ckpt / WEIGHTS_NAME), "pt") as f:
            for k in f.keys():
                numel += math.prod(f.get_slice(k).get_shape())
        try:
            itemsize = self._ensure().llm_engine.model_config.dtype.itemsize
        except Exception:
            itemsize = 4
        return numel * itemsize

    def benchmark(self, test_prompts: Sequence[Prompt], num_runs: int = 3, max_new_tokens: int = 128,
                  *, temperature: Optional[float] = None, warmup: bool = True,
                  chat_template: Optional[bool] = None,
                  workdir: Optional[str] = None, baseline_timeout: float = 1800,
                  verbose: bool = False) -> BenchmarkResult:
        """Run the same prompts with and without speculation and compare (all measured).

        How: the speculative runs use this engine (in this process); the baseline is the
        same model and engine settings *without* ``speculative_config``, started in a
        separate Python subprocess (``specstream_vllm.engine_job``) after the
        speculative runs finish, so the two never compete for the CPU and the baseline
        returns all its memory when it exits. Each prompt is sent alone (batch size 1),
        ``num_runs`` times, after one warm-up request; tokens/s = generated tokens / wall
        seconds summed over the prompts of a run, averaged over runs. Acceptance comes from
        vLLM's counters over the measured speculative runs. Memory: see :class:`MemoryOverhead`.
        """
        from ._memory import PeakSampler, children_hwm

        if num_runs < 1:
            raise ConfigError(f"num_runs must be >= 1, got {num_runs}")
        if isinstance(test_prompts, str) or _is_messages(test_prompts):
            test_prompts = [test_prompts]
        if not test_prompts:
            raise ConfigError("benchmark needs at least one prompt")
        llm = self._ensure()
        ids = self._prompt_token_ids(list(test_prompts), chat_template)
        temp = self.temperature if temperature is None else temperature
        log = print if verbose else (lambda *a, **k: None)

        # speculative runs, in this process
        spec_rates, spec_out, acc = _timed_runs(llm, ids, num_runs, max_new_tokens, temp, warmup,
                                                counters=True, sampler=PeakSampler(self._owner_base_rss))
        spec_peak = acc.pop("peak_rss")
        spec_hwm = children_hwm()
        log(f"[benchmark] specstream: {[round(r, 1) for r in spec_rates]} tok/s per run")

        # baseline: same engine settings without speculation, in a subprocess
        kw = self.llm_kwargs(speculative=False)
        try:
            json.dumps(kw)
        except TypeError as e:
            raise ConfigError(f"benchmark() passes the engine arguments to a subprocess as JSON; "
                              f"one of them is not JSON-serializable ({e})") from None
        job = {"llm_kwargs": kw, "prompt_ids": ids, "num_runs": num_runs,
               "max_new_tokens": max_new_tokens, "temperature": temp, "warmup": warmup}
        wd = Path(workdir or tempfile.mkdtemp(prefix="specstream-bench-"))
        wd.mkdir(parents=True, exist_ok=True)
        log("[benchmark] running the baseline (no speculation) in a subprocess ...")
        base = run_baseline(job, wd, baseline_timeout)
        log(f"[benchmark] baseline  : {[round(r, 1) for r in base['rates']]} tok/s per run")
        memory = MemoryOverhead(self.stream_parameter_bytes(), spec_peak, base["peak_rss"],
                                spec_hwm, base["hwm"])
        return BenchmarkResult(
            num_prompts=len(ids), num_runs=num_runs, max_new_tokens=max_new_tokens, gamma=self.gamma,
            speculative_tokens_per_second=sum(spec_rates) / len(spec_rates),
            baseline_tokens_per_second=sum(base["rates"]) / len(base["rates"]),
            speculative_run_tokens_per_second=spec_rates, baseline_run_tokens_per_second=base["rates"],
            acceptance=acc["acceptance"], memory=memory,
            speculative_token_ids=spec_out, baseline_token_ids=base["outputs"])


def _timed_runs(llm, ids: list[list[int]], num_runs: int, max_new_tokens: int, temperature: float,
                warmup: bool, counters: bool, sampler) -> tuple[list[float], list[list[int]], dict]:
    """Batch-1 timed runs over ``ids``; used in-process and by the baseline subprocess."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                            seed=0 if temperature else None)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    if warmup:
        llm.generate([prompts[0]], SamplingParams(max_tokens=min(8, max_new_tokens), temperature=0.0),
                     use_tqdm=False)
    before = read_spec_counters(llm) if counters else None
    rates, outputs = [], []
    with sampler:
        for _ in range(num_runs):
            toks, secs, outputs = 0, 0.0, []
            for p in prompts:
                t0 = time.perf_counter()
                out = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
                secs += time.perf_counter() - t0
                toks += len(out.token_ids)
                outputs.append(list(out.token_ids))
            rates.append(toks / secs)
    extra = {"peak_rss": sampler.peak}
    if counters:
        extra["acceptance"] = AcceptanceStats.delta(before, read_spec_counters(llm))
    return rates, outputs, extra


def run_baseline(job: dict, workdir: Path, timeout: float) -> dict:
    """Run the no-speculation engine in a fresh interpreter; raise with its log tail on failure."""
    from ..engine_job import run_in_subprocess

    return run_in_subprocess(dict(job, call="specstream_vllm.api._baseline:measure"), workdir,
                             "baseline", timeout)
