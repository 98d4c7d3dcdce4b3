"""Teacher-forced conversations: parsing, encoding, trainer steps, resume on unseen data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specstream_vllm.checkpoint import load_checkpoint, load_checkpoint_config
from specstream_vllm.training.conversations import (ConversationStream, encode_conversation,
                                                    frequent_tokens, load_conversations,
                                                    training_units)
from specstream_vllm.training.recipe import load_recipe
from specstream_vllm.training.teacher_forced import (assistant_runs, chain_consistent, read_manifest,
                                                     sample_tf_anchors)
from specstream_vllm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _sharegpt_file(path: Path, n: int = 40, truncate: bool = True) -> Path:
    items = []
    for i in range(n):
        turns = [{"from": "human", "value": f"Question {i}: how do I count to {i % 7 + 3}?"},
                 {"from": "gpt", "value": " ".join(str(k) for k in range(1, i % 7 + 4)) + ". Done."},
                 {"from": "human", "value": "And backwards?"},
                 {"from": "gpt", "value": " ".join(str(k) for k in range(i % 7 + 3, 0, -1)) + "."}]
        items.append({"id": f"conv{i}", "conversations": turns})
    items.append({"id": "odd", "conversations": [{"from": "gpt", "value": "no question first"}]})
    items.append({"id": "rep", "conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "human", "value": "twice"}]})
    text = json.dumps(items)
    if truncate:  # the packaged file is cut mid-record: the broken tail must be dropped
        text = text + ', {"id": "cut", "conversations": [{"from": "human", "val'
        text = text[:-1] if text.endswith("]") else text
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_load_conversations_split_order_and_irregular_turns(tmp_path):
    f = _sharegpt_file(tmp_path / "sg.json")
    train_ = load_conversations(f, "train", heldout_fraction=0.2)
    held = load_conversations(f, "heldout", heldout_fraction=0.2)
    ids = {c.id for c in train_} | {c.id for c in held}
    assert ids == {f"conv{i}" for i in range(40)}  # "odd" (no user turn) and "rep" (no answer) dropped
    assert not ({c.id for c in train_} & {c.id for c in held})
    assert all(len(c.messages) == 4 and c.messages[0]["role"] == "user" for c in train_)
    assert [c.id for c in load_conversations(f, "train", heldout_fraction=0.2)] == [c.id for c in train_]
    reordered = [c.id for c in load_conversations(f, "train", heldout_fraction=0.2, seed=1)]
    assert sorted(reordered) == sorted(c.id for c in train_) and reordered != [c.id for c in train_]
    excl = load_conversations(f, "train", heldout_fraction=0.2,
                              exclude_first_turns={"question 3: how do i count to 6?"})
    assert "conv3" not in {c.id for c in excl}


def test_encode_marks_exactly_the_assistant_turns(tmp_path, smol_tokenizer):
    f = _sharegpt_file(tmp_path / "sg.json", truncate=False)
    conv = load_conversations(f, "train", heldout_fraction=0.01)[0]
    enc = encode_conversation(smol_tokenizer, conv, 1000)
    text = smol_tokenizer.apply_chat_template(conv.messages, tokenize=False)
    assert smol_tokenizer.decode(enc.ids) == text
    spans, cur = [], []
    for tok, m in zip(enc.ids.tolist(), enc.assistant.tolist()):
        if m:
            cur.append(tok)
        elif cur:
            spans.append(smol_tokenizer.decode(cur)); cur = []
    if cur:
        spans.append(smol_tokenizer.decode(cur))
    assert spans == [conv.messages[1]["content"] + "<|im_end|>", conv.messages[3]["content"] + "<|im_end|>"]
    n = int(enc.assistant.nonzero()[0]) + 4  # a cut 4 tokens into the first answer
    cut = encode_conversation(smol_tokenizer, conv, n)
    assert cut.length == n and torch.equal(cut.ids, enc.ids[:n]) and int(cut.assistant.sum()) == 4


def test_stream_cursor_and_vocabulary(tmp_path, smol_tokenizer):
    f = _sharegpt_file(tmp_path / "sg.json")
    convs = load_conversations(f, "train", heldout_fraction=0.2)
    s = ConversationStream(smol_tokenizer, convs, 256)
    a = s.take(5)
    assert s.cursor == 5 and len(a) == 5
    b = ConversationStream(smol_tokenizer, convs, 256, cursor=5).take(5)
    assert [e.id for e in b] == [c.id for c in convs[5:10]]
    vocab = frequent_tokens(a, 10, always=[2])
    assert vocab.numel() <= 11 and 2 in vocab.tolist() and torch.equal(vocab, vocab.sort().values)


def test_second_pass_takes_every_later_window_and_the_continuations_once(tmp_path, smol_tokenizer):
    """After the first pass (first windows), the stream walks the rest of each conversation
    and the conversations that open with an assistant turn; every assistant token of the
    data is then seen exactly once, and a cursor + window saved mid-way resumes exactly."""
    f = _sharegpt_file(tmp_path / "sg.json")
    first = load_conversations(f, "train", heldout_fraction=0.2)
    more = load_conversations(f, "train", heldout_fraction=0.2, leading_assistant=True)
    assert [c.id for c in more] == ["odd"] or not more  # "odd" has no user turn after its lead
    lead = tmp_path / "lead.json"
    lead.write_text(json.dumps([{"id": "cont", "conversations": [
        {"from": "gpt", "value": "...continued answer"}, {"from": "human", "value": "Thanks, and 2+2?"},
        {"from": "gpt", "value": "2+2 is 4."}]}]))
    more = load_conversations(lead, "train", heldout_fraction=0.0, leading_assistant=True)
    assert [m["role"] for m in more[0].messages] == ["user", "assistant"]
    assert load_conversations(lead, "train", heldout_fraction=0.0) == []
    L = 60  # short windows: every conversation of the file spans two or more
    units = training_units(first, more, seed=0)
    assert [u.conv.id for u in units[:len(first)]] == [c.id for c in first]
    got = list(ConversationStream(smol_tokenizer, units, L))
    assert all(w.length <= L and int(w.assistant.sum()) >= 3 for w in got)
    whole = {c.id: encode_conversation(smol_tokenizer, c, 1 << 30) for c in first + more}
    seen = {}
    for w in got:
        cid = w.id.split("#w")[0]
        seen[cid] = seen.get(cid, 0) + int(w.assistant.sum())
    for cid, enc in whole.items():  # nothing lost, nothing twice (windows of < 3 answer tokens aside)
        assert int(enc.assistant.sum()) - 2 * (enc.length // L + 1) <= seen.get(cid, 0) <= int(enc.assistant.sum())
    s = ConversationStream(smol_tokenizer, units, L)
    head = s.take(len(first) + 3)
    resumed = ConversationStream(smol_tokenizer, units, L, cursor=s.cursor, window=s.window)
    assert [w.id for w in head + resumed.take(10 ** 6)] == [w.id for w in got]
    n1 = sum(1 for w in got if "#w" not in w.id and w.id != "cont")
    assert n1 >= len(first) - 2 and [w.id for w in got[:n1]] == [c.id for c in first][:n1]
    assert all("#w" in w.id or w.id == "cont" for w in got[n1:])


def test_anchor_and_target_validity_stay_inside_assistant_turns():
    asst = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    run = assistant_runs(asst)
    assert run[0].tolist() == [0, 0, 3, 2, 1, 0, 0, 2, 1, 0]
    anchors, valid = sample_tf_anchors(run, torch.tensor([10]), 8, torch.Generator().manual_seed(0))
    got = sorted(set(anchors[0][valid[0]].tolist()))
    assert got == [1, 2, 6]  # x_{t+1} and x_{t+2} are assistant tokens of one turn


def test_chain_targets_keep_stream_j_only_where_the_data_is_the_models_greedy_chain():
    """final[p] is one-hot on the model's greedy token for position p+1: stream j at anchor t
    stays only while the data's x_{t+2..t+j} equal those tokens (x_{t+1} is free)."""
    V, T = 6, 10
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2, 3, 4]])
    greedy_next = torch.tensor([1, 9, 3, 3, 4, 5, 2, 2, 3, 0]) % V  # the model's x_{p+1}
    final = torch.nn.functional.one_hot(greedy_next, V).float()[None] * 5.0
    head = torch.nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    anchors = torch.tensor([[0, 2, 4]])
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    keep = chain_consistent(valid, anchors, ids, final, head, chunk=2)
    # t=0: x2=2 vs greedy after final[1] (=3): stream 2, 3 dropped
    # t=2: x4=4 vs greedy after final[3] (=3): dropped at stream 2
    # t=4: x6=1 vs greedy after final[5] (=5): dropped
    assert keep[0].tolist() == [[True, False, False]] * 3
    greedy_next = ids[0, 1:].tolist() + [0]                          # the data is the greedy chain
    final = torch.nn.functional.one_hot(torch.tensor(greedy_next), V).float()[None] * 5.0
    final[0, 6] = torch.nn.functional.one_hot(torch.tensor(0), V) * 5.0  # ... but x_7 is not
    keep = chain_consistent(valid, anchors, ids, final, head)
    assert keep[0].tolist() == [[True, True, True], [True, True, True], [True, True, False]]
    assert not chain_consistent(torch.zeros_like(valid), anchors, ids, final, head).any()


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory, smollm2_dir):
    """A random tiny Llama with SmolLM2's tokenizer (and its chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    d = tmp_path_factory.mktemp("tinychat") / "model"
    LlamaForCausalLM(cfg).save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return d


def _tf_recipe(base: Path, data: Path, out: Path, **extra):
    over = {"base_model": str(base), "output_dir": str(out), "max_steps": 3, "num_streams": 3,
            "num_stream_layers": 2, "data.source": "sharegpt_conversations",
            "data.sharegpt_file": str(data), "data.draft_vocab_size": 64, "data.vocab_sample": 10,
            "data.heldout_fraction": 0.1, "seq_len": 96, "batch_size": 2, "anchors_per_seq": 8,
            "stream_input": "next_token", "token_map_rank": 4, "checkpoint_every": 2,
            "warmup_steps": 1, "token_map_fit_conversations": 4}
    over.update(extra)
    return load_recipe(ROOT / "configs" / "train_tiny_test.yaml", over)


def test_teacher_forced_training_writes_next_token_checkpoint_and_resumes(tiny_chat_model, tmp_path):
    data = _sharegpt_file(tmp_path / "sg.json")
    out = tmp_path / "run"
    res = train(_tf_recipe(tiny_chat_model, data, out), progress=False, log=lambda s: None)
    cfg, tensors = load_checkpoint(res.checkpoint_dir, base_model_dir=tiny_chat_model)
    assert cfg.stream_input == "next_token" and cfg.token_map_rank == 4
    assert tensors["token_map.B"].abs().sum() > 0  # g was trained
    assert cfg.draft_vocab_size == tensors["draft_vocab"].numel() <= 65
    m1 = read_manifest(out)
    assert m1["conversations_consumed"] == 4 + 6 and m1["tokens_seen"] > 0  # g's fit, then 3 steps
    # --resume: three more steps on conversations not seen yet
    res2 = train(_tf_recipe(tiny_chat_model, data, out), resume=True, progress=False, log=lambda s: None)
    m2 = read_manifest(out)
    assert res2.steps == 6 and m2["conversations_consumed"] == 16  # no second fit on resume
    assert m2["tokens_seen"] > m1["tokens_seen"] and len(m2["segments"]) == 2
    assert m2["segments"][1]["start_conversation"] == 10
    # a committed checkpoint without trainer state continues from its manifest's cursor
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in ("config.json", "model.safetensors", "data_manifest.json"):
        shutil.copy(out / name, shipped / name)
    out3 = tmp_path / "continued"
    train(_tf_recipe(tiny_chat_model, data, out3, init_from=str(shipped)), progress=False,
          log=lambda s: None)
    m3 = read_manifest(out3)
    assert m3["segments"][-1]["start_conversation"] == 16 and m3["conversations_consumed"] == 22
    assert torch.equal(load_checkpoint(out3)[1]["draft_vocab"], tensors["draft_vocab"])


def test_chain_targets_train_and_score_fewer_deep_targets(tiny_chat_model, tmp_path):
    from specstream_vllm.training import teacher_forced
    data = _sharegpt_file(tmp_path / "sg.json")
    seen = []
    real = teacher_forced.chain_consistent

    def spy(valid, *a, **k):
        keep = real(valid, *a, **k)
        seen.append((valid.sum((0, 1)), keep.sum((0, 1))))
        return keep
    teacher_forced.chain_consistent = spy
    try:
        res = train(_tf_recipe(tiny_chat_model, data, tmp_path / "c", chain_targets=True),
                    progress=False, log=lambda s: None)
    finally:
        teacher_forced.chain_consistent = real
    assert res.steps == 3 and len(seen) == 3
    before, after = (torch.stack(x).sum(0) for x in zip(*seen))
    assert after[0] == before[0]                         # stream 1: no agreement needed
    assert (after[1:] < before[1:]).all()                # a random model rarely agrees with text


def test_init_from_refuses_a_different_stream_form(tiny_chat_model, tmp_path):
    """A token-reading form cannot start from streams without a token map."""
    from specstream_vllm.errors import ConfigError
    data = _sharegpt_file(tmp_path / "sg.json")
    first = train(_tf_recipe(tiny_chat_model, data, tmp_path / "a", max_steps=1, stream_input="paper"),
                  progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="differ"):
        train(_tf_recipe(tiny_chat_model, data, tmp_path / "b", init_from=str(first.checkpoint_dir)),
              progress=False, log=lambda s: None)
    assert load_checkpoint_config(first.checkpoint_dir).stream_input == "paper"


_ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_init_from_a_next_token_checkpoint_continues_as_anchor_streams(tiny_chat_model, tmp_path):
    """next_token -> anchor: the token map is dropped; embeddings, LoRA, draft vocabulary and
    the data cursor are kept."""
    from transformers import AutoConfig

    from specstream_vllm.reference.streams import StreamParams
    from specstream_vllm.training.checkpoint_io import init_params
    data = _sharegpt_file(tmp_path / "sg.json")
    first = train(_tf_recipe(tiny_chat_model, data, tmp_path / "n", max_steps=1), progress=False,
                  log=lambda s: None)
    recipe = _tf_recipe(tiny_chat_model, data, tmp_path / "a", max_steps=1, stream_input="anchor",
                        init_from=str(first.checkpoint_dir))
    cfg = AutoConfig.from_pretrained(str(tiny_chat_model))
    params = StreamParams(cfg, 3, 2, recipe.lora, stream_input="anchor")
    logs: list[str] = []
    manifest, refit = init_params(params, cfg, recipe, tmp_path / "a", False, logs.append)
    assert not refit
    _, src = load_checkpoint(first.checkpoint_dir)
    mine = params.state_tensors()
    assert set(src) - set(mine) == {"token_map.A", "token_map.B"} and set(mine) <= set(src)
    assert all(torch.equal(mine[k], src[k]) for k in mine)
    assert any("token map is dropped" in m for m in logs)
    assert manifest["conversations_consumed"] == read_manifest(first.checkpoint_dir)["conversations_consumed"]
    # through the trainer: an anchor checkpoint, no token map, the same draft vocabulary
    res = train(recipe, progress=False, log=lambda s: None)
    cfg2, tensors = load_checkpoint(res.checkpoint_dir, base_model_dir=tiny_chat_model)
    assert cfg2.stream_input == "anchor" and cfg2.token_map_rank is None
    assert not any(k.startswith("token_map") for k in tensors)
    assert torch.equal(tensors["draft_vocab"], src["draft_vocab"])


def test_init_from_more_stream_layers_keeps_the_top_layers_and_refits_the_map(tiny_chat_model,
                                                                              tmp_path):
    """2 -> 1 stream layer: the top layer's LoRA and the embeddings kept, the lower layer's
    LoRA gone, the token map fitted anew at the new first stream layer; more layers than the
    source had are refused."""
    from transformers import AutoConfig

    from specstream_vllm.errors import ConfigError
    from specstream_vllm.reference.streams import StreamParams
    from specstream_vllm.training.checkpoint_io import init_params
    data = _sharegpt_file(tmp_path / "sg.json")
    first = train(_tf_recipe(tiny_chat_model, data, tmp_path / "two", max_steps=1), progress=False,
                  log=lambda s: None)
    _, src = load_checkpoint(first.checkpoint_dir)
    cfg = AutoConfig.from_pretrained(str(tiny_chat_model))
    top = cfg.num_hidden_layers - 1
    recipe = _tf_recipe(tiny_chat_model, data, tmp_path / "one", max_steps=1, num_stream_layers=1,
                        init_from=str(first.checkpoint_dir))
    params = StreamParams(cfg, 3, 1, recipe.lora, stream_input="next_token", token_map_rank=4)
    logs: list[str] = []
    manifest, refit = init_params(params, cfg, recipe, tmp_path / "one", False, logs.append)
    assert refit and manifest is not None
    mine = params.state_tensors()
    assert {k.split(".")[1] for k in mine if k.startswith("layers.")} == {str(top)}
    assert all(torch.equal(mine[k], src[k]) for k in mine if k.startswith("layers."))
    assert torch.equal(mine["stream_embeddings"], src["stream_embeddings"])
    assert any(f"start at layer {top}" in m for m in logs)
    res = train(recipe, progress=False, log=logs.append)
    assert any("g fitted by least squares" in m for m in logs)
    cfg1, tensors = load_checkpoint(res.checkpoint_dir, base_model_dir=tiny_chat_model)
    assert cfg1.num_stream_layers == 1 and not torch.equal(tensors["token_map.B"], src["token_map.B"])
    with pytest.raises(ConfigError, match="fewer stream layers"):
        train(_tf_recipe(tiny_chat_model, data, tmp_path / "three", num_stream_layers=3,
                         init_from=str(first.checkpoint_dir)), progress=False, log=lambda s: None)


def test_anchor_training_step_scores_the_anchor_form(tiny_chat_model, tmp_path, monkeypatch):
    """The stream states a teacher-forced anchor step scores are those of HF's own layers
    running each stream row beside the main rows <= t, seeing the main rows only."""
    import copy

    from transformers import AutoModelForCausalLM

    from specstream_vllm.reference.init import init_checkpoint
    from specstream_vllm.training import parallel
    from specstream_vllm.checkpoint import LoraSpec
    from tests.test_reference import hf_anchor_stream_logits
    start = init_checkpoint(tiny_chat_model, tmp_path / "start", num_streams=3, num_stream_layers=2,
                            lora=LoraSpec(rank=4, alpha=8.0, target_modules=_ALL_TARGETS),
                            init_std=0.5, random_lora_b=True, stream_input="anchor")
    seen = []
    real = parallel.StreamForward.forward

    def spy(self, main, anchors, g, next_tokens=None):
        out = real(self, main, anchors, g, next_tokens)
        seen.append((copy.deepcopy(self.params), main.layer_inputs[self.params.first_layer].detach().clone(),
                     anchors.clone(), next_tokens, out.detach().clone()))
        return out
    monkeypatch.setattr(parallel.StreamForward, "forward", spy)
    data = _sharegpt_file(tmp_path / "sg.json")
    train(_tf_recipe(tiny_chat_model, data, tmp_path / "a", max_steps=1, stream_input="anchor",
                     init_from=str(start), **{"lora.target_modules": _ALL_TARGETS}),
          progress=False, log=lambda s: None)
    assert len(seen) == 1
    params, h_first, anchors, nxt, hidden = seen[0]
    assert nxt is None and params.stream_input == "anchor"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float64,
                                                 attn_implementation="sdpa").eval()
    params = params.double()
    with torch.no_grad():
        for b in range(anchors.shape[0]):
            for a in range(0, anchors.shape[1], 3):
                t = int(anchors[b, a])
                slow = hf_anchor_stream_logits(model, params, None, t, 3, h_first=h_first[b].double())
                fast = model.lm_head(hidden[b, a].double())
                torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)  # float32 step


def test_init_from_switches_between_next_token_and_chain_streams(tiny_chat_model, tmp_path):
    """Both forms read x_{t+1} in stream 1 and hold the same tensors, so either may continue
    as the other (e.g. deep chain streams re-trained as one-pass next_token streams)."""
    data = _sharegpt_file(tmp_path / "sg.json")
    first = train(_tf_recipe(tiny_chat_model, data, tmp_path / "n", max_steps=1), progress=False,
                  log=lambda s: None)
    logs: list[str] = []
    chain = train(_tf_recipe(tiny_chat_model, data, tmp_path / "c", max_steps=1, stream_input="chain",
                             init_from=str(first.checkpoint_dir)), progress=False, log=logs.append)
    assert load_checkpoint_config(chain.checkpoint_dir).stream_input == "chain"
    assert any("continue as chain streams" in m for m in logs)
    logs.clear()
    back = train(_tf_recipe(tiny_chat_model, data, tmp_path / "b", max_steps=1,
                            init_from=str(chain.checkpoint_dir)), progress=False, log=logs.append)
    assert load_checkpoint_config(back.checkpoint_dir).stream_input == "next_token"
    assert any("continue as next_token streams" in m for m in logs)


def test_init_from_a_lower_lora_rank_widens_it_without_changing_the_streams(tiny_chat_model, tmp_path):
    from transformers import AutoConfig

    from specstream_vllm.checkpoint import LoraSpec
    from specstream_vllm.reference.streams import StreamParams
    from specstream_vllm.training.checkpoint_io import widen_lora as _widen_lora
    cfg = AutoConfig.from_pretrained(str(tiny_chat_model))
    targets = ["q_proj", "v_proj", "down_proj"]
    old = StreamParams(cfg, 3, 2, LoraSpec(rank=4, alpha=16, target_modules=targets))
    for b in old.lora_B.values():
        torch.nn.init.normal_(b)
    wide = StreamParams(cfg, 3, 2, LoraSpec(rank=8, alpha=16, target_modules=targets))
    tensors = _widen_lora(old.state_tensors(), old.lora, wide)
    assert tensors["layers.1.q_proj.lora_A"].shape[0] == 8
    for key in wide.lora_A:
        layer, name = key.split("_", 2)[1:]
        x = torch.randn(5, wide.lora_A[key].shape[1])
        with torch.no_grad():
            wide.lora_A[key].copy_(tensors[f"layers.{layer}.{name}.lora_A"])
            wide.lora_B[key].copy_(tensors[f"layers.{layer}.{name}.lora_B"])
        assert torch.allclose(wide.delta(int(layer), name, x), old.delta(int(layer), name, x), atol=1e-5)
    # through the trainer: a rank-4 checkpoint continued at rank 8; other differences refused
    from specstream_vllm.errors import ConfigError
    data = _sharegpt_file(tmp_path / "sg.json")
    lora4 = {"lora.rank": 4, "lora.target_modules": targets}
    first = train(_tf_recipe(tiny_chat_model, data, tmp_path / "r4", max_steps=1, **lora4),
                  progress=False, log=lambda s: None)
    logs: list[str] = []
    train(_tf_recipe(tiny_chat_model, data, tmp_path / "r8", max_steps=1, init_from=str(first.checkpoint_dir),
                     **{"lora.rank": 8, "lora.target_modules": targets}), progress=False, log=logs.append)
    assert any("LoRA rank 8" in m for m in logs)
    assert load_checkpoint_config(tmp_path / "r8").lora.rank == 8
    with pytest.raises(ConfigError, match="higher LoRA rank"):
        train(_tf_recipe(tiny_chat_model, data, tmp_path / "t", max_steps=1, init_from=str(first.checkpoint_dir),
                         **{"lora.rank": 8, "lora.target_modules": targets[:2]}), progress=False,
              log=lambda s: None)
