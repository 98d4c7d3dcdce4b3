"""The reference streams of every supported family against HF's own model.

The oracle needs no stream code: stream j of anchor t attends to the main stream at
positions <= t and to streams 1..j, so it is exactly position t + j of the sequence
``x_0..x_t`` followed by γ placeholder tokens, run through HF's own forward with the
residual entering layer L - N_s replaced at positions t+1.. by the stream inputs and the
stream LoRA added (by forward hooks) only there. HF's own code then supplies the
positions (rotary angles, ALiBi biases, learned embeddings at the input), the q/k norms
and the fused projections; the LoRA layouts of fused projections are written out here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specstream_vllm.checkpoint import LoraSpec
from specstream_vllm.families import FAMILIES, family_of
from specstream_vllm.reference.hf_layers import hf_layers
from specstream_vllm.reference.streams import StreamParams, main_pass, stream_logits


def make_tiny(path: Path, arch: str, *, hidden: int = 64, heads: int = 4, layers: int = 3,
              vocab: int = 128, seed: int = 0) -> Path:
    """A random-weight model of one family, saved as a normal HF directory."""
    import transformers as tf
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    if arch in ("qwen2", "mistral", "llama"):
        from tests.conftest import make_tiny_llama
        make_tiny_llama(path, heads=heads, kv_heads=heads // 2, layers=layers, hidden=hidden,
                        vocab=vocab, seed=seed, arch=arch)
        return path
    if arch == "qwen3":
        cfg = tf.Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=heads // 2, head_dim=hidden // heads,
                             intermediate_size=2 * hidden, max_position_embeddings=512, **common)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           ffn_dim=2 * hidden, word_embed_proj_dim=hidden, max_position_embeddings=512,
                           **common)
        model = tf.OPTForCausalLM(cfg)
    elif arch == "bloom":
        cfg = tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, **common)
        model = tf.BloomForCausalLM(cfg)
    elif arch == "phi":  # partial rotary and per-head q/k LayerNorms exercised
        cfg = tf.PhiConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=2 * hidden, partial_rotary_factor=0.5, qk_layernorm=True,
                           max_position_embeddings=512, **common)
        model = tf.PhiForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    with torch.no_grad():  # sharper logits: fewer near-ties between the engines
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.5)
        if model.lm_head.bias is not None:  # Phi: a bias that changes the argmax
            model.lm_head.bias.copy_(torch.randn_like(model.lm_head.bias))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


FAMILY_ARCHS = ["qwen2", "mistral", "qwen3", "gpt2", "opt", "bloom", "phi"]


@pytest.fixture(scope="module", params=FAMILY_ARCHS)
def family_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    d = make_tiny(tmp_path_factory.mktemp("fam") / request.param, request.param)
    return request.param, AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def _random_params(model, g: int, ns: int) -> StreamParams:
    fam = family_of(model.config)
    torch.manual_seed(1)
    p = StreamParams(model.config, g, ns, LoraSpec(rank=4, target_modules=list(fam.lora_targets)),
                     init_std=0.5, stream_input="next_token", token_map_rank=8)
    with torch.no_grad():
        for b in p.lora_B.values():
            b.normal_(0, 0.1)
        p.token_map_B.normal_(0, 0.3)
    return p


def _fused_delta(arch: str, dq, dk, dv, heads: int):
    """LoRA deltas of q/k/v laid out as the family's fused projection output."""
    if arch == "gpt2":  # [q | k | v]
        return torch.cat([dq, dk, dv], -1)
    if arch == "bloom":  # per head [q_h, k_h, v_h]
        hd = dq.shape[-1] // heads
        parts = [t.view(*t.shape[:-1], heads, hd) for t in (dq, dk, dv)]
        return torch.stack(parts, -2).reshape(*dq.shape[:-1], -1)
    raise ValueError(arch)


def _lora_hooks(arch, model, params, li, rows):
    """Forward hooks adding the stream LoRA of layer li to the rows ``rows`` only."""
    layer = hf_layers(model).layers()[li]
    d = lambda name, x: params.delta(li, name, x)  # noqa: E731
    hooks = []

    def on(module, names):
        def hook(mod, args, out):
            flat = out.dim() == 2  # OPT runs its MLP on [B * S, d] (B = 1 here)
            x = args[0][rows] if flat else args[0][:, rows]
            if len(names) == 3:
                add = _fused_delta(arch, d("q_proj", x), d("k_proj", x), d("v_proj", x),
                                   model.config.num_attention_heads)
            else:
                add = d(names[0], x)
            out = out.clone()
            if flat:
                out[rows] += add
            else:
                out[:, rows] += add
            return out
        hooks.append(module.register_forward_hook(hook))

    if arch == "gpt2":
        on(layer.attn.c_attn, ["q_proj", "k_proj", "v_proj"])
        on(layer.attn.c_proj, ["o_proj"])
        on(layer.mlp.c_fc, ["up_proj"])
        on(layer.mlp.c_proj, ["down_proj"])
    elif arch == "bloom":
        on(layer.self_attention.query_key_value, ["q_proj", "k_proj", "v_proj"])
        on(layer.self_attention.dense, ["o_proj"])
        on(layer.mlp.dense_h_to_4h, ["up_proj"])
        on(layer.mlp.dense_4h_to_h, ["down_proj"])
    elif arch in ("opt", "phi"):
        for n in ("q_proj", "k_proj", "v_proj"):
            on(getattr(layer.self_attn, n), [n])
        if arch == "opt":
            on(layer.self_attn.out_proj, ["o_proj"])
            on(layer.fc1, ["up_proj"])
            on(layer.fc2, ["down_proj"])
        else:
            on(layer.self_attn.dense, ["o_proj"])
            on(layer.mlp.fc1, ["up_proj"])
            on(layer.mlp.fc2, ["down_proj"])
    else:  # Llama layout (Qwen2, Mistral, Qwen3)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            on(getattr(layer.self_attn, n), [n])
        for n in ("gate_proj", "up_proj", "down_proj"):
            on(getattr(layer.mlp, n), [n])
    return hooks


def oracle_stream_logits(arch, model, params, ids, t, g):
    """[g, V]: HF's own forward over x_0..x_t + g placeholders, stream inputs injected."""
    main = main_pass(model, ids, params.layer_ids)
    h_t = main.layer_inputs[params.first_layer][0, t]
    e = model.get_input_embeddings()(ids[0, t + 1])
    xs = params.stream_inputs(h_t, g, e)  # [g, d]
    seq = torch.cat([ids[0, : t + 1], torch.full((g,), 3)]).unsqueeze(0)
    rows = slice(t + 1, t + 1 + g)
    layers = hf_layers(model).layers()

    def inject(mod, args, kwargs):
        hs = (args[0] if args else kwargs["hidden_states"]).clone()
        hs[:, rows] = xs.to(hs.dtype)
        if args:
            return (hs, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hs)

    hooks = [layers[params.first_layer].register_forward_pre_hook(inject, with_kwargs=True)]
    for li in params.layer_ids:
        hooks += _lora_hooks(arch, model, params, li, rows)
    try:
        out = model(input_ids=seq, use_cache=False).logits[0, rows]
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
@pytest.mark.parametrize("t", [0, 5, 10])
def test_family_streams_equal_hf_forward_with_injected_streams(family_model, t):
    arch, model = family_model
    g, ns = 3, 2
    params = _random_params(model, g, ns)
    ids = torch.randint(3, model.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(t))
    main = main_pass(model, ids, params.layer_ids)
    ours = stream_logits(model, params, main, torch.tensor([[t]]), g,
                         next_tokens=ids[:, t + 1:t + 2])[0, 0]
    ref = oracle_stream_logits(arch, model, params, ids, t, g)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    # the streams are not trivially the main model's own next-token logits
    assert not torch.allclose(ours[0], main.logits[0, t + 1], atol=1e-2)


def test_every_family_has_a_layer_description():
    assert set(_ARCH.values()) <= set(FAMILIES)


def test_unsupported_variants_are_refused(tmp_path):
    from transformers import OPTConfig

    from specstream_vllm.errors import UnsupportedArchitectureError
    cfg = OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                    do_layer_norm_before=False, architectures=["OPTForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match="post-layer-norm"):
        family_of(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="supported: .*GPT2LMHeadModel"):
        family_of({"architectures": ["FalconForCausalLM"]})


# --------------------------------------------------------------------------- trainer, decoder

def _family_dir(tmp_path_factory, arch: str) -> Path:
    return make_tiny(tmp_path_factory.mktemp("famtrain") / arch, arch, vocab=256)  # _examples: ids < 200


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_trainer_writes_a_checkpoint_the_reference_decodes_losslessly(arch, tmp_path_factory,
                                                                            monkeypatch):
    """A few lossless steps (next-token-aware streams, LoRA on every target the family has),
    then the checkpoint loads against its base, the reference decoder built from it
    reproduces plain greedy decoding, and `specstream eval`'s one-forward acceptance replays
    that decoder's steps draft by draft."""
    from transformers import AutoModelForCausalLM

    from specstream_vllm.checkpoint import load_checkpoint
    from specstream_vllm.reference.decoder import speculative_generate
    from specstream_vllm.training.trainer import train
    from tests.test_training import TINY, _examples
    from specstream_vllm.training.recipe import load_recipe

    base = _family_dir(tmp_path_factory, arch)
    out = tmp_path_factory.mktemp("famrun") / arch
    targets = list(family_of({"architectures": [_ARCH[arch]]}).lora_targets)
    recipe = load_recipe(TINY, {"base_model": str(base), "output_dir": str(out), "max_steps": 3,
                                "stream_input": "next_token", "token_map_rank": 8,
                                "lora": {"rank": 4, "alpha": 8.0, "target_modules": targets}})
    res = train(recipe, _examples(), progress=False, log=lambda s: None)
    cfg, tensors = load_checkpoint(res.checkpoint_dir, base_model_dir=base, num_speculative_tokens=3)
    assert cfg.base_model.architecture == _ARCH[arch] and cfg.stream_input == "next_token"
    assert f"layers.2.{targets[0]}.lora_A" in tensors
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    params = StreamParams.from_checkpoint(model.config, cfg, tensors)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    spec, stats = speculative_generate(model, params, ids, 20, 3)
    from tests.test_reference import _generate
    assert spec == _generate(model, ids, 20)
    # specstream eval: the same acceptance, step by step, from one forward over the answer
    from specstream_vllm.reference import decoder as dec
    from specstream_vllm.training.data import Example
    from specstream_vllm.training.evaluate import acceptance_on, stream_drafter
    records: list[tuple[int, int]] = []
    orig = dec.ReferenceAcceptance.record
    monkeypatch.setattr(dec.ReferenceAcceptance, "record",
                        lambda self, g, a: (records.append((g, a)), orig(self, g, a))[1])
    prompt = ids[0].tolist()
    _, _ = speculative_generate(model, params, ids, 20, 3)
    ref, records[:] = list(records), []
    rep = acceptance_on(model, [Example("e", prompt, spec)], {"s": (stream_drafter(params, 3), 3)},
                        list(params.layer_ids), [3], progress=False)
    assert rep["main_argmax_agreement_with_answer"] == 1.0  # the LM head (and its bias) as HF's
    assert len(records) >= 1 and records == ref[:len(records)] and stats.num_drafts > 0


@pytest.mark.parametrize("arch", ["gpt2", "bloom"])
def test_family_finetuned_mode_targets_the_family_modules(arch, tmp_path_factory):
    """Fine-tuned mode puts peft's LoRA on the family's own (fused) modules and saves a merged
    model whose streams load against it."""
    from specstream_vllm.checkpoint import STREAMS_SUBDIR, load_checkpoint
    from specstream_vllm.training.recipe import load_recipe
    from specstream_vllm.training.trainer import train
    from tests.test_training import TINY, _examples

    base = _family_dir(tmp_path_factory, arch)
    out = tmp_path_factory.mktemp("famft") / arch
    recipe = load_recipe(TINY, {"base_model": str(base), "output_dir": str(out), "max_steps": 2,
                                "mode": "finetuned", "loss": {"alpha0": 1.0},
                                "lora": {"rank": 4, "alpha": 8.0,
                                         "target_modules": ["q_proj", "o_proj", "down_proj"]}})
    train(recipe, _examples(), progress=False, log=lambda s: None)
    merged = out / "model"
    cfg, _ = load_checkpoint(merged / STREAMS_SUBDIR, base_model_dir=merged)
    assert cfg.mode == "finetuned" and cfg.base_model.architecture == _ARCH[arch]


def test_lora_target_a_family_lacks_is_refused_at_the_recipe(tmp_path_factory, tmp_path):
    from specstream_vllm.training.recipe import load_recipe
    from specstream_vllm.training.trainer import train
    from tests.test_training import TINY, _examples

    base = _family_dir(tmp_path_factory, "gpt2")
    recipe = load_recipe(TINY, {"base_model": str(base), "output_dir": str(tmp_path / "r"),
                                "max_steps": 1, "lora": {"rank": 4, "target_modules": ["gate_proj"]}})
    with pytest.raises(ValueError, match=r"gate_proj.*GPT2LMHeadModel"):
        train(recipe, _examples(), progress=False, log=lambda s: None)


_ARCH = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "opt": "OPTForCausalLM",
         "bloom": "BloomForCausalLM", "phi": "PhiForCausalLM"}
