"""Per-step costs of decoding, verification and the two ways to run the streams, on this device.

Decides which stream pass pays where: a *separate* pass after verification (γ stream rows per
request through the top N_s layers, then the draft head) or *one pass* (fused: the (γ+1)·γ stream
rows ride along with the γ+1 verified rows in the top N_s layers, each attending to the context
up to its anchor, no KV writes, so the weights are read once). A Llama-shaped model with random
weights in plain PyTorch (RMSNorm, rotary, GQA attention through SDPA over a dense per-sequence
KV cache, SwiGLU, LM and draft heads) times each form; CUDA replays captured graphs.

    python -m benchmarks.kernel_cost --model smollm2-135m --batch 1,4,16 --threads 1
    python -m benchmarks.kernel_cost --from-costs docs/kernel-cost-h200.json --acceptance 1.92,2.5
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from specstream_vllm.spec_counters import SpecCounters

FORMS = ("decode", "verify", "separate", "fused")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


PRESETS = {
    "llama-2-13b": Shape(5120, 40, 40, 40, 13824, 32000),
    "llama-3-8b": Shape(4096, 32, 32, 8, 14336, 128256),
    "smollm2-135m": Shape(576, 30, 9, 3, 1536, 49152),
}


def shape_from_config(path: str | Path) -> Shape:
    """A Hugging Face ``config.json`` (or the folder holding it) as a Llama shape."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(p.read_text())
        return Shape(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                     cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                     cfg["intermediate_size"], cfg["vocab_size"], cfg.get("head_dim") or 0)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--config {path}: not a readable Llama-style config.json ({e!r}); "
                         "it needs hidden_size, num_hidden_layers, num_attention_heads, "
                         "intermediate_size and vocab_size") from e


# ------------------------------------------------------------------ the model pieces

def _randn(*size: int, dev: torch.device, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return torch.empty(*size, device=dev, dtype=dtype).normal_(std=std)  # no float32 temporary


class _Layer:
    """One decoder layer's weights and its KV cache (batch, kv heads, context + new rows, hd)."""

    def __init__(self, s: Shape, batch: int, slots: int, dev: torch.device, dtype: torch.dtype):
        def w(*size: int) -> torch.Tensor:
            return _randn(*size, dev=dev, dtype=dtype, std=size[-1] ** -0.5)

        self.qkv = w((s.heads + 2 * s.kv_heads) * s.hd, s.hidden)
        self.o = w(s.hidden, s.heads * s.hd)
        self.gate_up = w(2 * s.intermediate, s.hidden)
        self.down = w(s.hidden, s.intermediate)
        self.ln1 = torch.ones(s.hidden, device=dev, dtype=dtype)
        self.ln2 = torch.ones(s.hidden, device=dev, dtype=dtype)
        self.cache(s, batch, slots)

    def cache(self, s: Shape, batch: int, slots: int) -> None:
        dev, dtype = self.qkv.device, self.qkv.dtype
        self.k = self.v = None  # the old cache goes before the new one comes
        self.k = _randn(batch, s.kv_heads, slots, s.hd, dev=dev, dtype=dtype)
        self.v = _randn(batch, s.kv_heads, slots, s.hd, dev=dev, dtype=dtype)


class Weights:
    """The measured layers, heads and stream embeddings: made once, shared by every batch size."""

    def __init__(self, st: "Setup") -> None:
        s, dev, dtype = st.shape, torch.device(st.device), getattr(torch, st.dtype)
        n = st.measured_layers if 0 < st.measured_layers < s.layers else s.layers
        self.layers = [_Layer(s, 1, 1, dev, dtype) for _ in range(n)]
        self.lm_head = _randn(s.vocab, s.hidden, dev=dev, dtype=dtype, std=s.hidden ** -0.5)
        self.draft_head = _randn(st.draft_vocab, s.hidden, dev=dev, dtype=dtype, std=s.hidden ** -0.5)
        self.emb = _randn(st.gamma, s.hidden, dev=dev, dtype=dtype)
        self.norm = torch.ones(s.hidden, device=dev, dtype=dtype)


@dataclass
class _Rows:
    """How a stage's rows sit: rotary per row, which leading rows write KV, the attention mask."""

    cos: torch.Tensor       # (rows, hd)
    sin: torch.Tensor
    writes: int             # the first `writes` rows store K/V at context .. context + writes
    keys: int               # keys attended: context + writes
    mask: torch.Tensor | None  # (group * rows, keys) additive: 0 or -inf; None: all keys seen


def _rows(positions: list[int], anchors: list[int], writes: int, context: int, hd: int,
          dev: torch.device, dtype: torch.dtype, group: int = 1) -> _Rows:
    """Row r sits at ``positions[r]`` and sees the cache plus new rows 0..``anchors[r]``; the
    mask repeats for the ``group`` query heads that share a KV head (they attend as extra rows)."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.tensor(positions, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    keys = context + writes
    mask = None
    if any(a < writes - 1 for a in anchors):
        seen = torch.arange(keys)[None, :] <= context + torch.tensor(anchors)[:, None]
        mask = torch.zeros(seen.shape).masked_fill(~seen, -math.inf).repeat(group, 1).to(dev, dtype)
    return _Rows(ang.cos().to(dev, dtype), ang.sin().to(dev, dtype), writes, keys, mask)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + 1e-5)).to(x.dtype) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def _layer(L: _Layer, s: Shape, x: torch.Tensor, r: _Rows, context: int) -> torch.Tensor:
    B, R, _ = x.shape
    q, k, v = F.linear(_rms(x, L.ln1), L.qkv).split(
        [s.heads * s.hd, s.kv_heads * s.hd, s.kv_heads * s.hd], dim=-1)
    q = _rope(q.view(B, R, s.heads, s.hd).transpose(1, 2), r.cos, r.sin)
    k = _rope(k.view(B, R, s.kv_heads, s.hd).transpose(1, 2), r.cos, r.sin)
    v = v.view(B, R, s.kv_heads, s.hd).transpose(1, 2)
    L.k[:, :, context:r.keys] = k[:, :, :r.writes]
    L.v[:, :, context:r.keys] = v[:, :, :r.writes]
    # GQA: the query heads of one KV head attend as one longer block of rows, so every backend
    # (masked ones included) reads each cached key once per KV head
    q = q.reshape(B, s.kv_heads, s.heads // s.kv_heads * R, s.hd)
    o = F.scaled_dot_product_attention(q, L.k[:, :, :r.keys], L.v[:, :, :r.keys], attn_mask=r.mask)
    x = x + F.linear(o.view(B, s.heads, R, s.hd).transpose(1, 2).reshape(B, R, s.heads * s.hd), L.o)
    g, u = F.linear(_rms(x, L.ln2), L.gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(g) * u, L.down)


# ------------------------------------------------------------------ the four forms

@dataclass
class Setup:
    shape: Shape
    gamma: int = 4
    stream_layers: int = 12
    draft_vocab: int = 8192
    context: int = 1024
    measured_layers: int = 0   # 0: all; else at most this many layers per stage, times scaled
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        s = self.shape
        if not 0 < self.stream_layers <= s.layers:
            raise SystemExit(f"--stream-layers {self.stream_layers}: must be in 1..{s.layers} "
                             "(the model's layers)")
        if self.gamma < 1 or self.context < 1 or self.draft_vocab < 1:
            raise SystemExit("--gamma, --context and --draft-vocab must be at least 1")
        if s.heads % s.kv_heads:
            raise SystemExit(f"{s.heads} attention heads are not a multiple of {s.kv_heads} KV heads")


#: a stage: (name, layers, row positions, row anchors, rows writing KV, entry); entry "streams"
#: turns each sequence's one anchor row into γ stream rows, "ride" appends (γ+1)·γ stream rows
#: to the γ+1 verified rows (the stream embeddings added to the anchor's hidden state)
_Stage = tuple[str, int, list[int], list[int], int, str]


def _stages(st: Setup) -> dict[str, list[_Stage]]:
    g, c, L, ns = st.gamma, st.context, st.shape.layers, st.stream_layers
    verified = (list(range(c, c + g + 1)), list(range(g + 1)))
    streams = ([c + i + 1 + j for i in range(g + 1) for j in range(g)],
               [i for i in range(g + 1) for _ in range(g)])
    return {
        "decode": [("layers", L, [c], [0], 1, "")],
        "verify": [("layers", L, *verified, g + 1, "")],
        "separate": [("top", ns, list(range(c, c + g)), list(range(g)), g, "streams")],
        "fused": [("bottom", L - ns, *verified, g + 1, ""),
                  ("top", ns, verified[0] + streams[0], verified[1] + streams[1], g + 1, "ride")],
    }


def rows_per_sequence(st: Setup) -> dict[str, dict[str, int]]:
    """Rows each form runs per sequence, by stage (the fused top stage: γ+1 + (γ+1)·γ)."""
    return {f: {stage[0]: len(stage[2]) for stage in stages if stage[1]}
            for f, stages in _stages(st).items()}


def build_steps(st: Setup, batch: int, weights: Weights | None = None
                ) -> dict[str, list[tuple[Callable[[], Any], float]]]:
    """Per form, segments ``(run, scale)``: its cost is the sum of ``scale`` times each segment's.

    With every layer measured a form is one segment (the whole step); with ``measured_layers`` K
    each stage runs at most K layers, scaled to its real count, and the head is its own segment."""
    s, dev, dtype = st.shape, torch.device(st.device), getattr(torch, st.dtype)
    scaled = 0 < st.measured_layers < s.layers
    wt = weights or Weights(st)
    layers, lm_head, draft_head, emb, norm = wt.layers, wt.lm_head, wt.draft_head, wt.emb, wt.norm
    n_alloc = len(layers)
    for lay in layers:
        lay.cache(s, batch, st.context + st.gamma + 1)
    g = st.gamma
    heads = {"decode": [(lm_head, slice(None))], "verify": [(lm_head, slice(None))],
             "separate": [(draft_head, slice(None))],
             "fused": [(lm_head, slice(0, g + 1)), (draft_head, slice(g + 1, None))]}

    def stack(x: torch.Tensor, use: list[_Layer], rows: _Rows, entry: str) -> torch.Tensor:
        if entry:  # (B, anchors, H) -> every anchor's γ stream rows
            streams = (x[:, :, None, :] + emb).flatten(1, 2)
            x = streams if entry == "streams" else torch.cat([x, streams], dim=1)
        for lay in use:
            x = _layer(lay, s, x, rows, st.context)
        return x

    steps: dict[str, list[tuple[Callable[[], Any], float]]] = {}
    for form, stages in _stages(st).items():
        segs = []  # (input, layers, rows, entry, scale)
        for name, n, pos, anchors, writes, entry in stages:
            if n == 0:
                continue
            first = s.layers - n if name == "top" and not scaled else 0
            use = layers[first:first + min(n, n_alloc)]
            n_in = 1 if entry == "streams" else g + 1 if entry == "ride" else len(pos)
            rows = _rows(pos, anchors, writes, st.context, s.hd, dev, dtype, s.heads // s.kv_heads)
            segs.append((torch.randn(batch, n_in, s.hidden, device=dev, dtype=dtype), use, rows,
                         entry, n / len(use)))
        x_head = torch.randn(batch, len(stages[-1][2]), s.hidden, device=dev, dtype=dtype)

        def head(x: torch.Tensor, form: str = form) -> list[torch.Tensor]:
            h = _rms(x, norm)  # 2-D contiguous rows: CPU bf16 linear on a 3-D slice is ~100x slower
            return [F.linear(h[:, rows].flatten(0, 1).contiguous(), w) for w, rows in heads[form]]

        if scaled:
            steps[form] = [(lambda seg=seg: stack(*seg[:4]), seg[4]) for seg in segs]
            steps[form].append((lambda x=x_head, head=head: head(x), 1.0))
        else:
            def whole(segs: list = segs, head: Callable = head) -> list[torch.Tensor]:
                x = segs[0][0]
                for _, use, rows, entry, _ in segs:
                    x = stack(x, use, rows, entry)
                return head(x)
            steps[form] = [(whole, 1.0)]
    return steps


# ------------------------------------------------------------------ timing

def _time(fn: Callable[[], Any], dev: torch.device, iters: int, warmup: int, graphs: bool
          ) -> tuple[float, float]:
    """Median and least ms of one call: perf_counter on CPU, CUDA events around a graph replay
    on CUDA (on a shared machine the least is the cost without the other jobs' share)."""
    if dev.type != "cuda":
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples), min(samples)
    run = fn
    if graphs:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        samples.append(a.elapsed_time(b))
    return statistics.median(samples), min(samples)


def measure(st: Setup, batches: list[int], iters: int = 10, warmup: int = 3,
            cuda_graphs: bool = True) -> list[dict[str, Any]]:
    """ms per step of each form at each batch size (median of ``iters``; and the least)."""
    dev = torch.device(st.device)
    out = []
    with torch.inference_mode():
        weights = Weights(st)
        for batch in batches:
            steps = build_steps(st, batch, weights)
            ms: dict[str, list[float]] = {}
            for form, segs in steps.items():
                times = [(scale, _time(fn, dev, iters, warmup, cuda_graphs)) for fn, scale in segs]
                ms[form] = [round(sum(sc * t[i] for sc, t in times), 4) for i in (0, 1)]
            out.append({"batch": batch, "ms": {f: v[0] for f, v in ms.items()},
                        "ms_least": {f: v[1] for f, v in ms.items()}})
            del steps
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------ projection

def project(results: list[dict[str, Any]], acceptances: list[float]) -> list[dict[str, Any]]:
    """Tokens/s against no speculation at T tokens per step (mean acceptance length):
    separate = T·decode / (verify + separate), fused = T·decode / fused."""
    rows = []
    for T in acceptances:
        for r in results:
            ms = r["ms"]
            sep = T * ms["decode"] / (ms["verify"] + ms["separate"])
            fused = T * ms["decode"] / ms["fused"]
            rows.append({**({"model": r["model"]} if "model" in r else {}), "batch": r["batch"],
                         "acceptance": T, "ratio_separate": round(sep, 3),
                         "ratio_fused": round(fused, 3), "better": "fused" if fused > sep else "separate"})
    return rows


def spec_totals(path: str | Path, method: str = "specstream") -> SpecCounters:
    """Spec-decode counters of ``method`` in a benchmark results file, summed over its levels
    (offline rounds or online runs; an online file's ``aggregate`` repeats the runs and is skipped)."""
    total = SpecCounters()

    def walk(o: Any, mine: bool) -> None:
        nonlocal total
        if isinstance(o, dict):
            mine = mine or o.get("method") == method
            if mine and isinstance(o.get("spec"), dict):
                total = total + SpecCounters.from_json(o["spec"])
            for k, v in o.items():
                if k not in ("spec", "aggregate"):
                    walk(v, mine or k == method)
        elif isinstance(o, list):
            for v in o:
                walk(v, mine)

    walk(json.loads(Path(path).read_text()), False)
    if total.drafts <= 0:
        raise SystemExit(f"--acceptance-from {path}: no drafts of method {method!r} in that file; "
                         "name a results.json of a run with that method (--acceptance-method)")
    return total


# ------------------------------------------------------------------ output

def _label(r: dict[str, Any], default: str) -> str:
    return r.get("model", default)


def markdown(doc: dict[str, Any]) -> str:
    st, model = doc.get("settings", {}), doc.get("settings", {}).get("model", "")
    least = all("ms_least" in r for r in doc["results"])
    lines = [("ms per step, median (least)" if least else "ms per step") + ":", "",
             f"| model | batch | decode | verify ({st.get('gamma', 'γ')}+1 rows) | separate | fused |"
             " fused - verify |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        ms = r["ms"]
        cells = [f"{ms[f]:.2f}" + (f" ({r['ms_least'][f]:.2f})" if least else "") for f in FORMS]
        lines.append(f"| {_label(r, model)} | {r['batch']} | " + " | ".join(cells)
                     + f" | {ms['fused'] - ms['verify']:.2f} |")
    accs = sorted({p["acceptance"] for p in doc["projection"]})
    by_row: dict[tuple[str, int], dict[float, dict[str, Any]]] = {}
    for p in doc["projection"]:
        by_row.setdefault((_label(p, model), p["batch"]), {})[p["acceptance"]] = p
    lines += ["", "tokens/s against no speculation, separate / one pass (the better in bold), at T tokens per step:", "",
              "| model | batch | " + " | ".join(f"T = {t:g}" for t in accs) + " |",
              "|---|---:|" + "---:|" * len(accs)]
    def cell(p: dict[str, Any]) -> str:
        sep, fused = f"{p['ratio_separate']:.2f}x", f"{p['ratio_fused']:.2f}x"
        return f"**{sep}** / {fused}" if p["better"] == "separate" else f"{sep} / **{fused}**"

    for (label, batch), cells in by_row.items():
        lines.append(f"| {label} | {batch} | " + " | ".join(cell(cells[t]) for t in accs) + " |")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_cost", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", choices=sorted(PRESETS))
    p.add_argument("--config", help="a Hugging Face config.json (or its folder) instead of --model")
    p.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--gamma", type=int, default=4, help="draft length γ")
    p.add_argument("--stream-layers", type=int, default=12, help="N_s: top layers the streams run")
    p.add_argument("--draft-vocab", type=int, default=8192, help="rows of the draft head")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, time replays of captured graphs")
    p.add_argument("--layers", type=int, default=0,
                   help="measure at most K layers per stage and scale per layer (0: all)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--acceptance", default="1.92,2.5", help="mean acceptance lengths to project")
    p.add_argument("--acceptance-from", help="a benchmark results.json: its mean acceptance length")
    p.add_argument("--acceptance-method", default="specstream", help="the method read there")
    p.add_argument("--from-costs", help="a costs JSON (this tool's --out): only project it")
    p.add_argument("--out", help="write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    acc = _floats(args.acceptance)
    if args.acceptance_from:
        acc = [round(spec_totals(args.acceptance_from, args.acceptance_method).mean_acceptance_length, 3)]
    if args.from_costs:
        doc = json.loads(Path(args.from_costs).read_text())
    else:
        from benchmarks.system import machine_info

        if args.threads:
            torch.set_num_threads(args.threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--device cuda: this torch sees no CUDA device; use --device cpu")
        shape = shape_from_config(args.config) if args.config else PRESETS[args.model]
        st = Setup(shape, args.gamma, args.stream_layers, args.draft_vocab, args.context,
                   args.layers, device, args.dtype)
        scaled = 0 < args.layers < shape.layers
        graphs = args.cuda_graphs and device.startswith("cuda")
        machine = machine_info()
        if device.startswith("cuda"):
            machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
        doc = {"command": "python -m benchmarks.kernel_cost " + shlex.join(sys.argv[1:] if argv is None else argv),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": machine,
               "settings": {"model": args.config or args.model, "shape": asdict(shape),
                            "gamma": args.gamma, "stream_layers": args.stream_layers,
                            "draft_vocab": args.draft_vocab, "context": args.context,
                            "dtype": args.dtype, "device": device, "cuda_graphs": graphs,
                            "threads": torch.get_num_threads(), "iters": args.iters,
                            "warmup": args.warmup, "scaled": scaled,
                            "measured_layers": min(args.layers, shape.layers) if scaled else shape.layers,
                            "rows_per_sequence": rows_per_sequence(st)},
               "results": measure(st, [int(b) for b in args.batch.split(",")], args.iters,
                                  args.warmup, graphs)}
    doc["projection"] = project(doc["results"], acc)
    st = doc.get("settings", {})
    if st.get("scaled"):
        print(f"scaled: {st['measured_layers']} of {st['shape']['layers']} layers measured per stage, "
              "times scaled per layer (heads measured once)")
    print(markdown(doc))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


if __name__ == "__main__":
    main()
