"""The reference Multi-Stream Attention and the reference speculative decoder."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from specstream_vllm.checkpoint import LoraSpec
from specstream_vllm.reference.decoder import draft_tokens, speculative_generate
from specstream_vllm.reference.streams import StreamParams, main_pass, stream_logits, teacher_tokens


def _rope(model, vec_heads: torch.Tensor, pos: int) -> torch.Tensor:
    """vec_heads: [heads, hd] at one position, rotated with HF's own helper."""
    cos, sin = model.model.rotary_emb(vec_heads[None], torch.tensor([[pos]]))
    q = vec_heads[None, :, None, :]  # [1, heads, 1, hd]
    out, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return out[0, :, 0, :]


def _lin(params, li, name, mod, x):
    y = mod(x)
    key = f"layers_{li}_{name}"
    if params.lora is not None and key in params.lora_A:
        y = y + x @ params.lora_A[key].t() @ params.lora_B[key].t() * params.lora.scaling
    return y


def _assert_batched_equals_per_anchor(model, params, slow_fn, g: int) -> None:
    """The batched reference (every anchor of two sequences at once) equals ``slow_fn`` run
    on one sequence and one anchor at a time."""
    ids = torch.randint(3, 256, (2, 12))
    anchors = torch.tensor([[0, 5, 11], [2, 3, 7]])
    fast = stream_logits(model, params, main_pass(model, ids, params.layer_ids), anchors)
    for b in range(2):
        for a, t in enumerate(anchors[b].tolist()):
            slow = slow_fn(model, params, ids[b:b + 1], t, g)
            torch.testing.assert_close(fast[b, a], slow, rtol=1e-9, atol=1e-9)


def naive_stream_logits(model, params, ids, t, g, next_token=None):
    """Build each stream's context by hand: main keys <= t, then streams 1..j. In the
    next-token-aware form the input also gets B A (E[x] / rms(E[x])) of ``next_token``; in
    the chain form ``next_token`` is a list, stream j getting that of its j-th entry."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    main = main_pass(model, ids, params.layer_ids)
    def g_of(tok):
        e = model.model.embed_tokens.weight[tok]
        e = e / torch.sqrt((e * e).mean() + 1e-6)
        return params.token_map_B @ (params.token_map_A @ e)
    if next_token is None:
        extra = [0.0] * g
    elif isinstance(next_token, list):
        extra = [g_of(tok) for tok in next_token]
    else:
        extra = [g_of(next_token)] * g
    xs = [main.layer_inputs[params.first_layer][0, t] + params.stream_embeddings[j] + extra[j]
          for j in range(g)]
    for li in params.layer_ids:
        layer = model.model.layers[li]
        att, mlp = layer.self_attn, layer.mlp
        mk, mv = [], []
        for tp in range(t + 1):
            hm = layer.input_layernorm(main.layer_inputs[li][0, tp])
            mk.append(_rope(model, att.k_proj(hm).view(KV, hd), tp))
            mv.append(att.v_proj(hm).view(KV, hd))
        sk, sv, new = [], [], []
        for j in range(g):
            hs = layer.input_layernorm(xs[j])
            q = _rope(model, _lin(params, li, "q_proj", att.q_proj, hs).view(H, hd), t + 1 + j)
            sk.append(_rope(model, _lin(params, li, "k_proj", att.k_proj, hs).view(KV, hd), t + 1 + j))
            sv.append(_lin(params, li, "v_proj", att.v_proj, hs).view(KV, hd))
            keys = torch.stack(mk + sk[: j + 1])  # [ctx, KV, hd]
            vals = torch.stack(mv + sv[: j + 1])
            heads = []
            for h in range(H):
                kvh = h // (H // KV)
                w = torch.softmax(keys[:, kvh] @ q[h] / hd ** 0.5, dim=0)
                heads.append(w @ vals[:, kvh])
            o = torch.cat(heads)
            x = xs[j] + _lin(params, li, "o_proj", att.o_proj, o)
            m = layer.post_attention_layernorm(x)
            a = mlp.act_fn(_lin(params, li, "gate_proj", mlp.gate_proj, m)) * \
                _lin(params, li, "up_proj", mlp.up_proj, m)
            new.append(x + _lin(params, li, "down_proj", mlp.down_proj, a))
        xs = new
    return torch.stack([model.lm_head(model.model.norm(x)) for x in xs])


@pytest.mark.parametrize("g,ns,lora", [(1, 1, None), (3, 2, None), (4, 4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), (5, 3, ["q_proj", "down_proj"])])
def test_stream_attention_matches_naive_loop(tiny_llama_dir, g, ns, lora):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64).eval()
    torch.manual_seed(1)
    params = StreamParams(model.config, g, ns, LoraSpec(rank=4, target_modules=lora) if lora else None,
                          init_std=0.5).double()
    with torch.no_grad():
        for b in params.lora_B.values():
            b.normal_(0, 0.1)
        _assert_batched_equals_per_anchor(model, params, naive_stream_logits, g)


def _sharp_token_streams(tiny_llama_dir, g, ns, form, seed):
    """A float64 model and random token-reading streams whose g and LoRA B are non-zero."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64).eval()
    torch.manual_seed(seed)
    params = StreamParams(model.config, g, ns, LoraSpec(rank=4, target_modules=["q_proj", "up_proj"]),
                          init_std=0.5, stream_input=form, token_map_rank=6).double()
    with torch.no_grad():
        params.token_map_B.normal_(0, 0.5)
        for b in params.lora_B.values():
            b.normal_(0, 0.1)
    return model, params


@pytest.mark.parametrize("g,ns", [(1, 1), (4, 2)])
def test_next_token_streams_match_naive_loop(tiny_llama_dir, g, ns):
    """Next-token-aware form: h_t + e_j + g(x_{t+1}), everything else as the paper's form."""
    model, params = _sharp_token_streams(tiny_llama_dir, g, ns, "next_token", 2)
    with torch.no_grad():
        ids = torch.randint(3, 256, (2, 12))
        anchors = torch.tensor([[0, 5, 10], [2, 3, 7]])
        nxt = torch.randint(3, 256, (2, 3))  # any token: in serving it is the one just sampled
        fast = stream_logits(model, params, main_pass(model, ids, params.layer_ids), anchors,
                             next_tokens=nxt)
        plain = stream_logits(model, params, main_pass(model, ids, params.layer_ids), anchors,
                              next_tokens=torch.full_like(nxt, 5))
        assert not torch.allclose(fast, plain)  # the token really enters the streams
        for b in range(2):
            for a, t in enumerate(anchors[b].tolist()):
                slow = naive_stream_logits(model, params, ids[b:b + 1], t, g, int(nxt[b, a]))
                torch.testing.assert_close(fast[b, a], slow, rtol=1e-9, atol=1e-9)
        with pytest.raises(ValueError, match="next"):
            stream_logits(model, params, main_pass(model, ids, params.layer_ids), anchors)


@pytest.mark.parametrize("form,gamma", [("next_token", 1), ("next_token", 4), ("chain", 1),
                                        ("chain", 4)])
def test_reference_decoder_is_lossless_token_forms(tiny_llama_dir, form, gamma):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    torch.manual_seed(gamma + (10 if form == "chain" else 0))
    params = StreamParams(model.config, 4, 2, LoraSpec(rank=2), init_std=0.3,
                          stream_input=form, token_map_rank=4)
    with torch.no_grad():
        params.token_map_B.normal_(0, 0.3)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    out, stats = speculative_generate(model, params, ids, 30, gamma)
    assert out == _generate(model, ids, 30)
    assert stats.num_drafts > 0


@pytest.mark.parametrize("g,ns", [(1, 1), (4, 2)])
def test_chain_streams_match_naive_loop(tiny_llama_dir, g, ns):
    """Chain form: stream j reads g(x_{t+j}); stream j's output depends on tokens 1..j only."""
    model, params = _sharp_token_streams(tiny_llama_dir, g, ns, "chain", 4)
    with torch.no_grad():
        ids = torch.randint(3, 256, (2, 12))
        anchors = torch.tensor([[0, 5, 10], [2, 3, 7]])
        toks = torch.randint(3, 256, (2, 3, g))
        main = main_pass(model, ids, params.layer_ids)
        fast = stream_logits(model, params, main, anchors, next_tokens=toks)
        for b in range(2):
            for a, t in enumerate(anchors[b].tolist()):
                slow = naive_stream_logits(model, params, ids[b:b + 1], t, g, toks[b, a].tolist())
                torch.testing.assert_close(fast[b, a], slow, rtol=1e-9, atol=1e-9)
        # the last stream's token reaches only the last stream
        changed = toks.clone()
        changed[..., -1] = (changed[..., -1] + 1) % 256
        other = stream_logits(model, params, main, anchors, next_tokens=changed)
        torch.testing.assert_close(other[..., :-1, :], fast[..., :-1, :], rtol=1e-9, atol=1e-9)
        assert not torch.allclose(other[..., -1, :], fast[..., -1, :])
        with pytest.raises(ValueError, match="chain streams need"):
            stream_logits(model, params, main, anchors, next_tokens=toks[..., 0])


def test_chain_drafts_read_the_previous_draft(tiny_llama_dir):
    """The decoder drafts chain streams one at a time: stream j's input is stream j-1's
    top-1, which is what teacher forcing feeds when the drafts are right."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64).eval()
    torch.manual_seed(5)
    params = StreamParams(model.config, 4, 2, LoraSpec(rank=2), init_std=0.5,
                          stream_input="chain", token_map_rank=4).double()
    with torch.no_grad():
        params.token_map_B.normal_(0, 0.5)
    ids = torch.randint(3, 256, (1, 9))
    drafts = draft_tokens(model, params, ids, 5, 4, next_token=17).tolist()
    main = main_pass(model, ids, params.layer_ids)
    read = torch.tensor([[[17] + drafts[:3]]])
    forced = stream_logits(model, params, main, torch.tensor([[5]]), 4, next_tokens=read)[0, 0]
    assert forced.argmax(-1).tolist() == drafts
    # teacher tokens at an anchor: x_{t+1..t+g}, clamped at the end of the text
    assert teacher_tokens(params, ids[0], torch.tensor([5]), 4).tolist() == [
        ids[0, 6:9].tolist() + [int(ids[0, 8])]]


def test_streams_ignore_future_main_tokens(tiny_llama_dir):
    """Changing tokens after the anchor must not change its streams."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64).eval()
    params = StreamParams(model.config, 3, 2, init_std=0.5).double()
    ids = torch.randint(3, 256, (1, 10))
    ids2 = ids.clone()
    ids2[0, 6:] = torch.randint(3, 256, (4,))
    with torch.no_grad():
        a = stream_logits(model, params, main_pass(model, ids, params.layer_ids), torch.tensor([[5]]))
        b = stream_logits(model, params, main_pass(model, ids2, params.layer_ids), torch.tensor([[5]]))
    torch.testing.assert_close(a, b)


def _generate(model, ids, n, eos=None):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          eos_token_id=eos, pad_token_id=0)[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_reference_decoder_is_lossless_tiny(tiny_llama_dir, gamma):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    torch.manual_seed(gamma)
    params = StreamParams(model.config, 5, 2, LoraSpec(rank=2), init_std=0.3)
    for seed in range(3):
        ids = torch.randint(3, 256, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
        out, stats = speculative_generate(model, params, ids, 30, gamma)
        assert out == _generate(model, ids, 30)
        assert stats.num_drafts > 0 and len(stats.accepted_per_position) == gamma


def test_reference_decoder_accepts_when_streams_are_oracles(tiny_llama_dir, monkeypatch):
    """Acceptance accounting: with perfect drafts every step accepts all γ tokens."""
    import specstream_vllm.reference.decoder as dec
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    truth = _generate(model, ids, 40)
    params = StreamParams(model.config, 3, 1)

    def oracle(model_, params_, seq_ids, anchor, gamma, main=None, next_token=None):
        full = ids[0].tolist() + truth
        return torch.tensor(full[anchor + 2: anchor + 2 + gamma])

    monkeypatch.setattr(dec, "draft_tokens", oracle)
    out, stats = dec.speculative_generate(model, params, ids, 33, 3)
    assert out == truth[:33]
    assert stats.num_accepted == 3 * stats.num_drafts
    assert stats.mean_acceptance_length == 4.0


def test_reference_decoder_is_lossless_smollm2(smollm2_fp32):
    model, tok = smollm2_fp32
    torch.manual_seed(0)
    params = StreamParams(model.config, 4, 4, LoraSpec(rank=4), init_std=0.02)
    for q in ["What is the capital of France?"]:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        out, _ = speculative_generate(model, params, ids, 16, 4, eos_token_id=tok.eos_token_id)
        assert out == _generate(model, ids, 16, eos=tok.eos_token_id)[: len(out)]
        assert len(out) == 16 or out[-1] == tok.eos_token_id


_ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_anchor_stream_logits(model, params, ids, t, g, h_first=None):
    """The anchor form computed by HF's own decoder layers: the main rows 0..t and g stream
    rows h_t + e_j (positions t+1..t+g) run the top layers as one sequence under a 4-D mask
    that lets a stream row see the main rows only (not itself, not other streams); forward
    hooks add the stream LoRA to the stream rows. ``h_first`` [T, d]: the main states
    entering the first stream layer (default: from ``ids`` [1, T]). ``model`` must use sdpa
    attention (eager softmaxes in float32 even for a float64 model)."""
    if h_first is None:
        h_first = model(ids[:, :t + 1], output_hidden_states=True).hidden_states[params.first_layer][0]
    x = torch.cat([h_first[:t + 1], h_first[t] + params.stream_embeddings[:g]])[None]
    S = t + 1 + g
    pos = torch.arange(S)[None]
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))
    allowed[t + 1:, t + 1:] = False
    mask = torch.zeros(S, S, dtype=x.dtype).masked_fill(~allowed, float("-inf"))[None, None]
    hooks = []
    for li in params.layer_ids:
        layer = model.model.layers[li]
        for name in (params.lora.target_modules if params.lora else []):
            mod = getattr(layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                          else layer.mlp, name)
            a, b = params.lora_A[f"layers_{li}_{name}"], params.lora_B[f"layers_{li}_{name}"]

            def hook(m, inp, out, a=a, b=b):
                extra = torch.zeros_like(out)
                extra[:, t + 1:] = inp[0][:, t + 1:] @ a.t() @ b.t() * params.lora.scaling
                return out + extra
            hooks.append(mod.register_forward_hook(hook))
    try:
        cos_sin = model.model.rotary_emb(x, pos)
        for li in params.layer_ids:
            x = model.model.layers[li](x, attention_mask=mask, position_ids=pos,
                                       position_embeddings=cos_sin)
            x = x[0] if isinstance(x, tuple) else x
    finally:
        for hk in hooks:
            hk.remove()
    return model.lm_head(model.model.norm(x[0, t + 1:]))


def _anchor_streams(tiny_llama_dir, g, ns, seed=6):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float64,
                                                 attn_implementation="sdpa").eval()
    torch.manual_seed(seed)
    params = StreamParams(model.config, g, ns, LoraSpec(rank=3, target_modules=_ALL_TARGETS),
                          init_std=0.5, stream_input="anchor").double()
    with torch.no_grad():
        for b in params.lora_B.values():
            b.normal_(0, 0.1)
    return model, params


@pytest.mark.parametrize("g,ns", [(1, 1), (4, 3)])
def test_anchor_streams_match_hf_layers_under_a_main_only_mask(tiny_llama_dir, g, ns):
    """Anchor form: h_t + e_j at position t+j attending to the main keys <= t only."""
    model, params = _anchor_streams(tiny_llama_dir, g, ns)
    with torch.no_grad():
        _assert_batched_equals_per_anchor(model, params, hf_anchor_stream_logits, g)


def test_anchor_streams_do_not_see_each_other(tiny_llama_dir):
    """A stream's output depends on its own input only: changing e_1 leaves streams 2..g
    as they were, and asking for fewer streams leaves the first ones unchanged; the paper
    form on the same tensors (stream-stream attention) differs."""
    model, params = _anchor_streams(tiny_llama_dir, 4, 2)
    with torch.no_grad():
        ids = torch.randint(3, 256, (1, 10))
        anchors = torch.tensor([[3, 8]])
        main = main_pass(model, ids, params.layer_ids)
        full = stream_logits(model, params, main, anchors)
        torch.testing.assert_close(stream_logits(model, params, main, anchors, 2), full[:, :, :2])
        params.stream_embeddings[0] += 1.0
        moved = stream_logits(model, params, main, anchors)
        torch.testing.assert_close(moved[:, :, 1:], full[:, :, 1:])
        assert not torch.allclose(moved[:, :, 0], full[:, :, 0])
        params.stream_input = "paper"
        paper = stream_logits(model, params, main, anchors)
        assert not torch.allclose(paper[:, :, 1:], moved[:, :, 1:])


@pytest.mark.parametrize("gamma", [1, 4])
def test_reference_decoder_is_lossless_anchor_form(tiny_llama_dir, gamma):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    torch.manual_seed(gamma + 20)
    params = StreamParams(model.config, 4, 2, LoraSpec(rank=2), init_std=0.3, stream_input="anchor")
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    out, stats = speculative_generate(model, params, ids, 30, gamma)
    assert out == _generate(model, ids, 30)
    assert stats.num_drafts > 0
