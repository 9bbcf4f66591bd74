"""The native ChatGLM3 model against upstream's reference outputs (../shared/parity), and its own invariants
on tiny models: checkpoint I/O, KV cache, padding, packing, gradient checkpointing, generation, chat."""
import json
import stat

import pytest
import torch

import chatglm3
from chatglm3 import ChatGLMConfig, ChatGLMError, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from chatglm3.checkpoint.loading import load_ptuning_checkpoint
from chatglm3.output_files import new_file_mode

ATOL = 1e-4


@pytest.fixture(scope="module")
def golden(shared):
    return json.loads((shared / "parity" / "model_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def upstream_tiny(shared):
    return ChatGLMForConditionalGeneration.from_pretrained(shared / "parity" / "tiny-chatglm3")


def random_model(seed=0, **overrides) -> ChatGLMForConditionalGeneration:
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, kv_channels=8, multi_query_attention=True,
               multi_query_group_num=2, ffn_hidden_size=56, padded_vocab_size=128, add_qkv_bias=True, seq_length=256)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**cfg))
    with torch.no_grad():  # non-trivial norms and biases, so a mapping error cannot hide behind ones and zeros
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ---- parity with upstream ----------------------------------------------------------------------------

def test_logits_match_upstream(upstream_tiny, golden):
    for case in golden["logits"]:
        logits = upstream_tiny(torch.tensor([case["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[-1], torch.tensor(case["last_logits"]), atol=ATOL, rtol=0)
        assert logits.argmax(-1).tolist() == case["argmax"]
        torch.testing.assert_close(torch.logsumexp(logits, -1), torch.tensor(case["logsumexp"]), atol=ATOL, rtol=0)


def test_loss_matches_upstream(upstream_tiny, golden):
    case = golden["loss"]
    out = upstream_tiny(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]))
    assert out.loss.item() == pytest.approx(case["loss"], abs=ATOL)
    assert out.logits is None  # no full-vocabulary logits when training
    full = upstream_tiny(torch.tensor([case["input_ids"]]), labels=torch.tensor([case["labels"]]), return_logits=True)
    assert full.logits.shape == (1, len(case["input_ids"]), 65024)


def test_greedy_matches_upstream(upstream_tiny, golden):
    for case in golden["greedy"]:
        ids = torch.tensor([case["input_ids"]])
        out = upstream_tiny.generate(ids, max_new_tokens=24, eos_token_id=[])
        assert out[0, : ids.shape[1]].tolist() == case["input_ids"]
        assert out[0, ids.shape[1]:].tolist() == case["new_ids"]


def test_ptuning_matches_upstream(shared, golden):
    ref = golden["ptuning"]
    model = ChatGLMForConditionalGeneration.from_pretrained(
        shared / "parity" / "tiny-chatglm3", pre_seq_len=ref["pre_seq_len"], prefix_projection=ref["prefix_projection"])
    load_ptuning_checkpoint(model, shared / "parity" / "tiny-ptuning")
    for case in ref["logits"]:
        logits = model(torch.tensor([case["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[-1], torch.tensor(case["last_logits"]), atol=ATOL, rtol=0)
        assert logits.argmax(-1).tolist() == case["argmax"]
    greedy = ref["greedy"] if isinstance(ref["greedy"], list) else [ref["greedy"]]
    for case in greedy:
        ids = torch.tensor([case["input_ids"]])
        assert model.generate(ids, max_new_tokens=24, eos_token_id=[])[0, ids.shape[1]:].tolist() == case["new_ids"]


def test_auto_classes_load_without_remote_code(shared):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = shared / "parity" / "tiny-chatglm3"
    assert isinstance(AutoConfig.from_pretrained(path), ChatGLMConfig)
    assert isinstance(AutoModel.from_pretrained(path), ChatGLMForConditionalGeneration)
    assert isinstance(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True), ChatGLMForConditionalGeneration)
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, ChatGLMTokenizer) and tok.get_command("<|user|>") == 64795


# ---- checkpoint I/O -----------------------------------------------------------------------------------

UPSTREAM_KEYS = {
    "transformer.embedding.word_embeddings.weight", "transformer.rotary_pos_emb.inv_freq",
    "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight",
    "transformer.encoder.layers.0.input_layernorm.weight",
    "transformer.encoder.layers.0.self_attention.query_key_value.weight",
    "transformer.encoder.layers.0.self_attention.query_key_value.bias",
    "transformer.encoder.layers.0.self_attention.dense.weight",
    "transformer.encoder.layers.0.post_attention_layernorm.weight",
    "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight",
}


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("shape", [dict(), dict(num_layers=3, multi_query_group_num=1), dict(multi_query_group_num=4), dict(multi_query_attention=False)])
def test_save_load_round_trip(tmp_path, safe, shape):
    model = random_model(**shape)
    model.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB")
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    index = json.loads((tmp_path / f"{stem}.{ext}.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.startswith(f"{stem}-0000") and s.endswith(ext) for s in shards)
    # readable like any new file (safetensors alone writes 0o600: a server under another account could not load it)
    assert {stat.S_IMODE((tmp_path / s).stat().st_mode) for s in shards} == {new_file_mode()}
    assert UPSTREAM_KEYS <= set(index["weight_map"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["architectures"] == ["ChatGLMForConditionalGeneration"]
    loaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    ids = torch.randint(0, 120, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    # saving again replaces the old shards instead of mixing with them
    loaded.save_pretrained(tmp_path, safe_serialization=safe)
    assert not list(tmp_path.glob(f"{stem}-*"))
    torch.testing.assert_close(ChatGLMForConditionalGeneration.from_pretrained(tmp_path)(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_load_in_half_precision(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    for dtype in (torch.bfloat16, torch.float16):
        half = ChatGLMForConditionalGeneration.from_pretrained(tmp_path, torch_dtype=dtype, pre_seq_len=4)
        assert half.transformer.output_layer.weight.dtype == dtype
        assert half.transformer.prefix_encoder.embedding.weight.dtype == torch.float32  # trained in fp32
        logits = half(torch.randint(0, 120, (1, 7))).logits
        assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


def test_auto_dtype_is_the_dtype_config_json_records(tmp_path):
    model = random_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"  # both names, for transformers 4 and 5 readers
    assert ChatGLMForConditionalGeneration.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float32
    for key in ("dtype", "torch_dtype"):
        (tmp_path / "config.json").write_text(json.dumps({**{k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}, key: "bfloat16"}))
        assert ChatGLMForConditionalGeneration.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.bfloat16
        assert ChatGLMForConditionalGeneration.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    del config["dtype"], config["torch_dtype"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert ChatGLMForConditionalGeneration.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float32


def test_the_chatglm3_package_has_no_import_cycle():
    """Every module's imports of the package (also those inside functions), as a graph without a cycle, and the
    parts layered: model <- data <- checkpoint <- serving, the model core importing only the checkpoint format its
    from_pretrained/save_pretrained read and write (checkpoint.native)."""
    import ast
    from pathlib import Path

    package = Path(chatglm3.__file__).parent

    def dotted(path):
        parts = path.relative_to(package.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {dotted(f): f for f in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{name}: relative import"
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chatglm3"):
                # `from chatglm3.x import y` names module chatglm3.x.y or something of chatglm3.x
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("chatglm3")}
        graph[name] = deps - {name}

    def part(name):
        return name.split(".")[1] if name.count(".") >= 1 else "__init__"

    for name, deps in graph.items():
        below = {"model": {"model"}, "data": {"model", "data"}, "checkpoint": {"model", "data", "checkpoint"}}
        if part(name) in below:
            crossing = {d for d in deps if part(d) in {"model", "data", "checkpoint", "serving", "__init__"}
                        and part(d) not in below[part(name)]}
            if name == "chatglm3.model.modeling":
                crossing -= {"chatglm3.checkpoint.native"}
            assert not crossing, f"{name} imports {sorted(crossing)}"
    # output files, JSON reading, numbers and quantization sit at the bottom, importing only errors.
    for leaf in ("chatglm3.output_files", "chatglm3.json_files", "chatglm3.hub", "chatglm3.checkpoint.quantization"):
        assert graph[leaf] <= {"chatglm3.errors"}, (leaf, graph[leaf])
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph.get(name, ())):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(modules):
        visit(name)


def test_load_errors_name_file_and_key(tmp_path):
    with pytest.raises(ChatGLMError, match="not found"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "nope")
    with pytest.raises(ChatGLMError, match="config.json"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    model = random_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ChatGLMError, match="model_type"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "kv_channels": 16}))
    with pytest.raises(ChatGLMError, match=r"model.safetensors: .*transformer.embedding.word_embeddings.weight.*shape"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ChatGLMError, match=r"lack .*layers\.2\."):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 1}))
    with pytest.raises(ChatGLMError, match=r"unexpected tensor 'transformer.encoder.layers.1"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ChatGLMError, match="no weights found"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


def test_ptuning_checkpoint_errors(tmp_path):
    base = random_model(pre_seq_len=4)
    pt_dir = tmp_path / "pt"
    prefix = {k: v for k, v in base.state_dict().items() if k.startswith("transformer.prefix_encoder.")}
    base.save_pretrained(pt_dir, state_dict=prefix, safe_serialization=False)
    assert set(torch.load(pt_dir / "pytorch_model.bin", weights_only=True)) == {"transformer.prefix_encoder.embedding.weight"}
    with pytest.raises(ChatGLMError, match=r"pre_seq_len"):
        load_ptuning_checkpoint(random_model(pre_seq_len=8), pt_dir)
    with pytest.raises(ChatGLMError, match=r"prefix_projection"):
        load_ptuning_checkpoint(random_model(pre_seq_len=4, prefix_projection=True), pt_dir)
    with pytest.raises(ChatGLMError, match=r"no prefix encoder"):
        load_ptuning_checkpoint(random_model(), pt_dir)
    full_dir = tmp_path / "full"
    random_model().save_pretrained(full_dir)
    with pytest.raises(ChatGLMError, match="not a P-Tuning checkpoint"):
        load_ptuning_checkpoint(random_model(pre_seq_len=4), full_dir)
    other = random_model(pre_seq_len=4, seed=1)
    load_ptuning_checkpoint(other, pt_dir)
    torch.testing.assert_close(other.transformer.prefix_encoder.embedding.weight, prefix["transformer.prefix_encoder.embedding.weight"])


# ---- P-Tuning v2 behaviour -------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [False, True])
def test_ptuning_trains_only_the_prefix(projection):
    model = random_model(pre_seq_len=4, prefix_projection=projection).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    assert ("transformer.prefix_encoder.trans.0.weight" in trainable) == projection
    ids = torch.randint(0, 120, (2, 10))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # upstream's dropout (0.1) on the prefix in training mode only
    torch.manual_seed(0)
    a = model(ids, return_logits=True, labels=ids).logits
    b = model(ids, return_logits=True, labels=ids).logits
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)


def test_prefix_is_visible_to_every_token_and_positions_start_at_zero():
    plain = random_model()
    prefixed = random_model(pre_seq_len=3)
    prefixed.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        prefixed.transformer.prefix_encoder.embedding.weight.zero_()
    ids = torch.randint(0, 120, (1, 6))
    # A zero prefix adds keys with score 0 and zero values: outputs differ from no prefix only through the
    # softmax denominator, so the first token (which would otherwise attend only to itself) must change...
    assert not torch.allclose(prefixed(ids).logits[0, 0], plain(ids).logits[0, 0])
    # ...and with the prefix removed again (an empty prefix cache) positions starting at 0 reproduce the plain model.
    empty = tuple((k[:, :, :0], v[:, :, :0]) for k, v in prefixed.transformer.get_prompt(1))
    prefixed.transformer.pre_seq_len = 0
    torch.testing.assert_close(prefixed(ids, past_key_values=empty).logits, plain(ids).logits, atol=1e-6, rtol=0)


# ---- attention masks: cache, padding, packing ------------------------------------------------------------

@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_kv_cache_matches_full_forward(pre_seq_len):
    model = random_model(pre_seq_len=pre_seq_len)
    ids = torch.randint(0, 120, (2, 12))
    full = model(ids).logits
    out = model(ids[:, :7], use_cache=True)
    step = model(ids[:, 7:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, 7:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_padding_does_not_change_the_loss(pre_seq_len):
    model = random_model(pre_seq_len=pre_seq_len)
    a, b = torch.randint(0, 120, (7,)), torch.randint(0, 120, (11,))
    la, lb = a.clone(), b.clone()
    la[:3] = -100
    lb[:5] = -100

    def batch(width):
        ids = torch.zeros(2, width, dtype=torch.long)
        labels = torch.full((2, width), -100)
        mask = torch.zeros(2, width, dtype=torch.long)
        for row, (x, y) in enumerate([(a, la), (b, lb)]):
            ids[row, : len(x)], labels[row, : len(x)], mask[row, : len(x)] = x, y, 1
        return model(ids, attention_mask=mask, labels=labels).loss

    torch.testing.assert_close(batch(16), batch(64), atol=1e-6, rtol=0)
    # the mean over labelled tokens of both samples
    ref_logits = [model(x[None]).logits[0, :-1] for x in (a, b)]
    ce = torch.nn.functional.cross_entropy(torch.cat(ref_logits), torch.cat([la[1:], lb[1:]]), ignore_index=-100)
    torch.testing.assert_close(batch(16), ce, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_packed_loss_equals_unpacked(pre_seq_len):
    model = random_model(pre_seq_len=pre_seq_len)
    seqs = [torch.randint(0, 120, (n,)) for n in (5, 9, 4)]
    labels = [s.clone() for s in seqs]
    for lab in labels:
        lab[:2] = -100
    packed_ids = torch.cat(seqs + [torch.zeros(6, dtype=torch.long)])[None]
    packed_labels = torch.cat(labels + [torch.full((6,), -100)])[None]
    segments = torch.cat([torch.full((len(s),), i + 1) for i, s in enumerate(seqs)] + [torch.zeros(6, dtype=torch.long)])[None]
    packed = model(packed_ids, attention_mask=segments, labels=packed_labels, return_logits=True)
    width = max(len(s) for s in seqs)
    ids = torch.zeros(3, width, dtype=torch.long)
    lab = torch.full((3, width), -100)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = s, l, 1
    unpacked = model(ids, attention_mask=mask, labels=lab, return_logits=True)
    assert abs(packed.loss.item() - unpacked.loss.item()) < 1e-5
    start = 0
    for i, s in enumerate(seqs):  # every segment sees only itself, with positions from 0
        torch.testing.assert_close(packed.logits[0, start:start + len(s)], unpacked.logits[i, : len(s)], atol=1e-5, rtol=0)
        start += len(s)


def test_gradient_checkpointing_gives_the_same_gradients():
    for pre_seq_len in (None, 4):
        grads = []
        for checkpointing in (False, True):
            model = random_model(pre_seq_len=pre_seq_len, hidden_dropout=0.0).train()
            model.transformer.prefix_dropout = torch.nn.Identity() if pre_seq_len else None
            if checkpointing:
                model.gradient_checkpointing_enable()
                assert model.is_gradient_checkpointing
            ids = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(1))
            model(ids, labels=ids).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


# ---- generation and chat ------------------------------------------------------------------------------

@pytest.mark.parametrize("pre_seq_len", [None, 3])
def test_batched_left_padded_generation_equals_one_by_one(pre_seq_len):
    model = random_model(pre_seq_len=pre_seq_len)
    prompts = [torch.randint(3, 120, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12, eos_token_id=[])
        assert batched[i, width:].tolist() == alone[0, len(p):].tolist()


def test_generation_stops_and_samples():
    model = random_model()
    ids = torch.randint(3, 120, (1, 5))
    greedy = model.generate(ids, max_new_tokens=10, eos_token_id=[])
    first = greedy[0, 5].item()
    stopped = model.generate(ids, max_new_tokens=10, eos_token_id=first)
    assert stopped.shape[1] == 6 and stopped[0, -1].item() == first
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, eos_token_id=[])
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, eos_token_id=[])
    assert a.tolist() == b.tolist() and a.shape == (1, 15)
    penalised = model.generate(ids, max_new_tokens=10, repetition_penalty=100.0, eos_token_id=[])
    assert len(set(penalised[0, 5:].tolist()) & set(ids[0].tolist())) == 0  # never repeats a seen token


def test_streamer_protocol():
    model = random_model()
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.tolist())

        def end(self):
            seen.append("end")

    ids = torch.randint(3, 120, (1, 5))
    out = model.generate(ids, max_new_tokens=4, eos_token_id=[], streamer=Streamer())
    assert seen[0] == ids.tolist() and seen[-1] == "end"
    assert [s[0] for s in seen[1:-1]] == out[0, 5:].tolist()


def test_chat_and_stream_chat_on_tiny_model(tiny_model):
    model, tokenizer = chatglm3.load_model_and_tokenizer(tiny_model)
    assert model.device.type == "cpu" and model.dtype == torch.float32 and not model.training
    response, history = model.chat(tokenizer, "皮卡丘是什么属性？", max_new_tokens=8, do_sample=False)
    assert history[0] == {"role": "user", "content": "皮卡丘是什么属性？"}
    assert history[-1]["role"] == "assistant"
    streamed = list(model.stream_chat(tokenizer, "皮卡丘是什么属性？", max_new_tokens=8, do_sample=False))
    assert streamed[-1] == (response, history)
    # the second turn's prompt holds the first turn
    second = tokenizer.build_chat_input("它的弱点呢？", history=history)["input_ids"][0].tolist()
    first = tokenizer.build_chat_input("皮卡丘是什么属性？")["input_ids"][0].tolist()
    assert second[: len(first)] == first


def test_tool_calls_are_parsed_without_eval():
    assert chatglm3.parse_tool_call("```python\ntool_call(name='皮卡丘', level=5, tags=['a'])\n```") == {"name": "皮卡丘", "level": 5, "tags": ["a"]}
    for bad in ("tool_call(x=__import__('os').system('echo pwned'))", "os.system('x')", "tool_call('positional')", "tool_call(**{'a': 1})"):
        with pytest.raises(ValueError):
            chatglm3.parse_tool_call(bad)
    response, history = chatglm3.process_response("pokedex_lookup\n```python\ntool_call(name='妙蛙种子')\n```", [])
    assert response == {"name": "pokedex_lookup", "parameters": {"name": "妙蛙种子"}}
    assert history[-1]["metadata"] == "pokedex_lookup"
    response, _ = chatglm3.process_response("\n 你好 ", [])
    assert response == "你好"


def test_load_model_and_tokenizer_errors(tiny_model, shared, tmp_path):
    with pytest.raises(ChatGLMError, match="more than the model's vocabulary"):
        chatglm3.load_model_and_tokenizer(tiny_model, tokenizer_path=shared / "chatglm3-tokenizer")
    with pytest.raises(ChatGLMError, match="pre_seq_len"):
        chatglm3.load_model_and_tokenizer(shared / "parity" / "tiny-chatglm3", pt_checkpoint=shared / "parity" / "tiny-ptuning", pre_seq_len=8)
    model, _ = chatglm3.load_model_and_tokenizer(shared / "parity" / "tiny-chatglm3", pt_checkpoint=shared / "parity" / "tiny-ptuning")
    assert model.config.pre_seq_len == 4
