"""chatglm3.data.reader and preprocess_utils: upstream's multi-turn ids and labels, truncation, data checks, collators
and packing."""
import json

import pytest
import sentencepiece
import torch
from torch.utils.data import DataLoader

from chatglm3.model.conversation import IGNORE_INDEX, encode_sample
from chatglm3.data.reader import DataFormatError, load_conversations, load_input_output
from chatglm3.model.tokenizer import ChatGLMTokenizer
from preprocess_utils import (
    DataCollatorForChatGLM,
    DataCollatorForPacking,
    InputOutputDataset,
    MixedDataset,
    MultiTurnDataset,
    PackedDataset,
    WeightedEpochSampler,
    build_dataset,
    build_training_set,
    pack_samples,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tokenizer trained here, so the tests below that use it run without ../shared."""
    directory = tmp_path_factory.mktemp("tiny_sp")
    lines = [f"第{i}号宝可梦的属性是{'水火草电'[i % 4]}，弱点是{'电水火草'[i % 4]}。Pokémon number {i}." for i in range(300)]
    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=300,
        hard_vocab_limit=False, byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2,
    )
    return ChatGLMTokenizer.from_pretrained(str(directory))


def conversation(*turns, **extra):
    """conversation(("user", "hi"), ("assistant", "hello")) -> a multi-turn sample."""
    return {"conversations": [{"role": role, "content": content} for role, content in turns], **extra}


SAMPLES = [
    conversation(("user", "皮卡丘是什么属性？"), ("assistant", "电属性。")),
    conversation(("system", "你是宝可梦图鉴。"), ("user", "小火龙"), ("assistant", "火属性，弱点是水、地面和岩石。"), ("user", "进化？"), ("assistant", "16级进化成火恐龙。")),
    conversation(("user", "hi"), ("assistant", "Hello! Ask me about Pokémon.")),
    conversation(("user", "杰尼龟"), ("assistant", "水属性。")),
    conversation(("user", "妙蛙种子的弱点"), ("assistant", "火、冰、飞行和超能力。")),
]


# --- upstream parity ---------------------------------------------------------------------------------------------
def test_multiturn_ids_and_labels_match_upstream(real_tokenizer, tokenizer_golden):
    assert len(tokenizer_golden["multiturn"]) == 4
    for case in tokenizer_golden["multiturn"]:
        tokens, labels = encode_sample(real_tokenizer, case["example"])
        assert tokens == case["input_ids"]
        assert labels == case["labels"]
    dataset = MultiTurnDataset([case["example"] for case in tokenizer_golden["multiturn"]], real_tokenizer, max_seq_length=None, verbose=False)
    assert [item["input_ids"] for item in dataset] == [case["input_ids"] for case in tokenizer_golden["multiturn"]]
    assert [item["labels"] for item in dataset] == [case["labels"] for case in tokenizer_golden["multiturn"]]
    assert dataset.lengths == [len(case["input_ids"]) for case in tokenizer_golden["multiturn"]]


def test_observation_messages_are_not_learnt(real_tokenizer):
    sample = conversation(("user", "查一下"), ("observation", "{\"x\": 1}"), ("assistant", "好的"))
    tokens, labels = encode_sample(real_tokenizer, sample)
    observation = real_tokenizer.build_single_message("observation", "", "{\"x\": 1}")
    start = 2 + len(real_tokenizer.build_single_message("user", "", "查一下"))
    assert tokens[start:start + len(observation)] == observation
    assert set(labels[start:start + len(observation) + 1]) == {IGNORE_INDEX}


def test_tool_entry_observation_is_json(real_tokenizer):
    sample = {"conversations": [
        {"role": "user", "content": "几倍？"},
        {"role": "tool", "name": "type_chart", "parameters": {"attack": "电", "n": 2}, "observation": {"x": 0, "说明": "无效"}},
        {"role": "assistant", "content": "0倍。"},
    ]}
    tokens, _ = encode_sample(real_tokenizer, sample)
    text = real_tokenizer.decode(tokens)
    assert "<|assistant|>type_chart\n ```python\ntool_call(attack='电', n=2)\n```" in text
    assert '<|observation|>\n {"x": 0, "说明": "无效"}' in text


# --- truncation and dropping -------------------------------------------------------------------------------------
def test_truncation_keeps_ids_and_labels_aligned(tiny, capsys):
    # Whole turns are dropped from the end (tests/test_tools.py checks the rule itself): what is left is a prefix
    # of the whole sample closed by eos.
    full = MultiTurnDataset(SAMPLES, tiny, max_seq_length=None, verbose=False)
    limit = 24
    short = MultiTurnDataset(SAMPLES, tiny, max_seq_length=limit)
    cuts = [encode_sample(tiny, sample, limit) for sample in SAMPLES]
    kept = [(whole, cut) for whole, cut in zip(full, cuts) if any(label != IGNORE_INDEX for label in cut[1])]
    assert len(short) == len(kept)
    for (whole, (ids, labels)), item in zip(kept, short):
        assert item == {"input_ids": ids, "labels": labels}
        assert ids[:-1] == whole["input_ids"][:len(ids) - 1] and ids[-1] == tiny.eos_token_id
        assert labels[:-1] == whole["labels"][:len(ids) - 1]
    assert short.num_truncated == sum(n > limit for n in full.lengths)
    assert short.num_dropped == len(SAMPLES) - len(kept)
    assert max(short.lengths) <= limit
    out = capsys.readouterr().out
    assert f"{short.num_truncated} truncated" in out and f"{short.num_dropped} dropped" in out


def test_samples_without_a_reply_to_learn_are_dropped_and_named(tiny, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    rows = [SAMPLES[0], conversation(("user", "只有问题")), SAMPLES[3], {"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "loss": False}]}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    dataset = MultiTurnDataset(load_conversations(path), tiny, max_seq_length=512)
    assert len(dataset) == 2 and dataset.num_dropped == 2 and dataset.num_truncated == 0
    assert dataset.dropped == [f"{path}:2", f"{path}:4"]
    assert f"{path}:2, {path}:4" in capsys.readouterr().out


def test_samples_given_as_a_plain_list_are_checked_and_named_by_position(tiny):
    bad = {"conversations": [{"role": "user", "content": 3}]}
    with pytest.raises(DataFormatError, match=r"sample 2: conversations\[0\]: .* must be a string, got number"):
        MultiTurnDataset([SAMPLES[0], bad], tiny, max_seq_length=None, verbose=False)
    with pytest.raises(DataFormatError, match=r"sample 1: .*\"response\""):
        InputOutputDataset([{"prompt": "x"}], tiny, 8, 8, verbose=False)


def test_dataset_with_nothing_left_is_an_error(tiny):
    with pytest.raises(DataFormatError, match="empty"):
        MultiTurnDataset(SAMPLES, tiny, max_seq_length=4, verbose=False)


# --- loading and checking files ----------------------------------------------------------------------------------
def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = json.dumps(SAMPLES[0], ensure_ascii=False)


@pytest.mark.parametrize("bad_line, message", [
    ('{"conversations": [', "invalid JSON"),
    ('{"messages": []}', "this sample is in the openai format but line 1 is chatglm3"),
    ('{"dialogue": []}', 'missing the "conversations" list'),
    ('{"conversations": "hi"}', '"conversations" must be a non-empty list'),
    ('{"conversations": []}', "empty list"),
    ('[1, 2]', "a sample must be a JSON object"),
    ('{"conversations": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ('{"conversations": [{"role": "user", "content": 123}]}', '"content" must be a string, got number'),
    ('{"conversations": [{"role": "user"}]}', 'missing "content"'),
    ('{"conversations": [{"role": "tool", "parameters": {}}]}', 'needs a "name"'),
    ('{"conversations": [{"role": "tool", "name": "f", "parameters": "a=1"}]}', '"parameters" \\(an object\\)'),
    ('{"conversations": [{"role": "assistant", "content": "x", "loss": "no"}]}', '"loss" must be true or false'),
    ('{"tools": {"name": "f"}, "conversations": [{"role": "user", "content": "x"}]}', '"tools" must be a list'),
])
def test_bad_jsonl_line_is_reported_with_file_and_line(tmp_path, bad_line, message):
    path = write(tmp_path, f"{GOOD}\n\n{bad_line}\n{GOOD}\n")
    with pytest.raises(DataFormatError, match=message) as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}:3:")


def test_message_index_is_named(tmp_path):
    path = write(tmp_path, '{"conversations": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n')
    with pytest.raises(DataFormatError, match=r":1: conversations\[1\]: .*unknown role 'robot'"):
        load_conversations(path)


def test_json_list_file_reports_the_line_of_the_bad_sample(tmp_path):
    samples = [SAMPLES[0], SAMPLES[1], {"conversations": [{"role": "user", "content": None}]}]
    # Sample k (0-based) starts on line 2 + 2k: "[", then each sample followed by a blank line.
    path = write(tmp_path, "[\n" + ",\n\n".join(json.dumps(s, ensure_ascii=False) for s in samples) + "\n]", name="data.json")
    with pytest.raises(DataFormatError, match=r'"content" must be a string, got null') as error:
        load_conversations(path)
    assert str(error.value).startswith(f"{path}:6:")
    broken = write(tmp_path, '[\n  {"conversations": []},\n  {"conversations": [}\n]', name="broken.json")
    with pytest.raises(DataFormatError, match="invalid JSON") as error:
        load_conversations(broken)
    assert str(error.value).startswith(f"{broken}:3:")


def test_good_files_load_json_list_jsonl_blank_lines_and_bom(tmp_path):
    as_list = write(tmp_path, json.dumps(SAMPLES, ensure_ascii=False, indent=4), name="a.json")
    as_jsonl = write(tmp_path, "\ufeff" + "\n\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES) + "\n\n", name="b.jsonl")
    assert load_conversations(as_list) == SAMPLES
    records = load_conversations(as_jsonl)
    assert records == SAMPLES
    assert records.locations == [f"{as_jsonl}:{line}" for line in (1, 3, 5, 7, 9)]


@pytest.mark.parametrize("content, message", [
    ("", "holds no samples"),
    ("\n  \n", "holds no samples"),
    ("[]", "holds no samples"),
    ('{\n  "conversations": []\n}', "single JSON object"),
    (f"[{GOOD}] x", "after the closing"),
])
def test_empty_or_misshapen_files(tmp_path, content, message):
    with pytest.raises(DataFormatError, match=message):
        load_conversations(write(tmp_path, content))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataFormatError, match="not found") as error:
        load_conversations(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(error.value) and "找不到" in str(error.value)
    with pytest.raises(DataFormatError, match="is a directory"):
        load_conversations(tmp_path)
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"conversations": [{"role": "user", "content": "café"}]}'.encode("latin-1"))
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_conversations(latin)


# --- input-output format -----------------------------------------------------------------------------------------
def test_input_output_dataset(real_tokenizer, tmp_path, capsys):
    path = write(tmp_path, "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"prompt": "类型#宝可梦*属性#电", "response": "皮卡丘是电属性的宝可梦。"},
        {"prompt": "很长的提示" * 20, "response": "很长的回答" * 20},
    ]))
    dataset = build_dataset(path, real_tokenizer, "input-output", max_source_length=16, max_target_length=12)
    first, second = dataset[0], dataset[1]
    source = real_tokenizer.encode("类型#宝可梦*属性#电")
    target = real_tokenizer.encode("皮卡丘是电属性的宝可梦。", add_special_tokens=False) + [real_tokenizer.eos_token_id]
    assert first["input_ids"] == source + target
    assert first["labels"] == [IGNORE_INDEX] * len(source) + target
    assert second["input_ids"][:16] == real_tokenizer.encode("很长的提示" * 20)[:16]
    assert second["labels"] == [IGNORE_INDEX] * 16 + real_tokenizer.encode("很长的回答" * 20, add_special_tokens=False)[:12] + [real_tokenizer.eos_token_id]
    assert dataset.num_truncated == 1 and dataset.max_seq_length == 29
    assert "1 truncated" in capsys.readouterr().out
    bad = write(tmp_path, '{"prompt": "x"}\n', name="bad.jsonl")
    with pytest.raises(DataFormatError, match=r':1: 缺少 "response"（字符串）/ missing "response" \(a string\)'):
        load_input_output(bad)


def test_build_dataset_multi_turn_and_bad_format(tiny, tmp_path):
    path = write(tmp_path, "\n".join(json.dumps(s, ensure_ascii=False) for s in SAMPLES))
    assert len(build_dataset(path, tiny, "multi-turn", max_seq_length=256, verbose=False)) == len(SAMPLES)
    with pytest.raises(DataFormatError, match="unknown train format 'chat'"):
        build_dataset(path, tiny, "chat")


# --- collators ---------------------------------------------------------------------------------------------------
def test_collator_pads_to_multiple_of_8_on_the_right(tiny):
    dataset = MultiTurnDataset(SAMPLES, tiny, max_seq_length=None, verbose=False)
    items = [dataset[0], dataset[1]]
    batch = DataCollatorForChatGLM(tiny)(items)
    longest = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] % 8 == 0 and longest <= batch["input_ids"].shape[1] < longest + 8
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"]
        assert batch["labels"][row, :n].tolist() == item["labels"]
        assert set(batch["input_ids"][row, n:].tolist()) <= {tiny.pad_token_id}
        assert set(batch["labels"][row, n:].tolist()) <= {IGNORE_INDEX}
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_max_length_and_left_padding(tiny):
    dataset = MultiTurnDataset(SAMPLES, tiny, max_seq_length=None, verbose=False)
    item = dataset[0]
    n = len(item["input_ids"])
    batch = DataCollatorForChatGLM(tiny, padding="max_length", max_length=100)([item])
    assert batch["input_ids"].shape == (1, 100)
    left = DataCollatorForChatGLM(tiny, padding_side="left", pad_to_multiple_of=None)([item, dataset[1]])
    width = max(n, len(dataset[1]["input_ids"]))
    assert left["input_ids"].shape[1] == width
    assert left["input_ids"][0, width - n:].tolist() == item["input_ids"]
    assert left["attention_mask"][0].tolist() == [0] * (width - n) + [1] * n
    with pytest.raises(ValueError, match="more than max_length=8"):
        DataCollatorForChatGLM(tiny, padding="max_length", max_length=8)([item])
    with pytest.raises(ValueError, match="needs max_length"):
        DataCollatorForChatGLM(tiny, padding="max_length")


def test_collator_in_a_dataloader(tiny):
    dataset = MultiTurnDataset(SAMPLES, tiny, max_seq_length=64, verbose=False)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=DataCollatorForChatGLM(tiny)))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) == sum(
        sum(label != IGNORE_INDEX for label in item["labels"]) for item in dataset)


# --- packing -----------------------------------------------------------------------------------------------------
def packed_segments(row):
    """[(input_ids, labels)] of each segment of a packed row, checking segment ids run 1, 2, 3, ..."""
    segments, ids = [], row["attention_mask"]
    assert ids[0] == 1 and all(b in (a, a + 1) for a, b in zip(ids, ids[1:]))
    for segment in range(1, max(ids) + 1):
        positions = [p for p, s in enumerate(ids) if s == segment]
        segments.append(([row["input_ids"][p] for p in positions], [row["labels"][p] for p in positions]))
    return segments


def test_packing_places_every_sample_exactly_once(tiny):
    samples = SAMPLES * 7
    dataset = MultiTurnDataset(samples, tiny, max_seq_length=None, verbose=False)
    limit = max(dataset.lengths) + 20
    rows = pack_samples(dataset.items, limit)
    found = [segment for row in rows for segment in packed_segments(row)]
    expected = [(item["input_ids"], item["labels"]) for item in dataset]
    assert sorted(map(repr, found)) == sorted(map(repr, expected))
    assert all(len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"]) <= limit for row in rows)
    assert len(rows) < len(dataset)  # several conversations share rows
    assert pack_samples(dataset.items, limit) == rows  # deterministic


def test_packed_labels_never_cross_a_boundary(tiny):
    dataset = MultiTurnDataset(SAMPLES * 3, tiny, max_seq_length=None, verbose=False)
    packed = PackedDataset(dataset, max_seq_length=128, verbose=False)
    for row in packed:
        mask = row["attention_mask"]
        for p in range(1, len(mask)):
            if mask[p] != mask[p - 1]:
                # The token that starts a conversation is never a target of the previous one.
                assert row["labels"][p] == IGNORE_INDEX and row["input_ids"][p] == tiny.get_command("[gMASK]")
    batch = DataCollatorForPacking(tiny)([packed[0], packed[len(packed) - 1]])
    assert "position_ids" not in batch
    assert batch["input_ids"].shape[1] % 8 == 0
    assert batch["attention_mask"][0, : len(packed[0]["attention_mask"])].tolist() == packed[0]["attention_mask"]
    short = len(packed[len(packed) - 1]["input_ids"])
    assert set(batch["attention_mask"][1, short:].tolist()) <= {0}
    assert packed.lengths == [len(row["input_ids"]) for row in packed.rows]


def test_packing_rejects_what_it_cannot_pack(tiny, capsys):
    dataset = MultiTurnDataset(SAMPLES, tiny, max_seq_length=None)
    with pytest.raises(ValueError, match="more than the packing length"):
        pack_samples(dataset.items, 8)
    leaky = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    with pytest.raises(ValueError, match="leak"):
        pack_samples(leaky, 16)
    PackedDataset(dataset, 512)
    assert f"{len(SAMPLES)} samples -> 1 rows" in capsys.readouterr().out
    with pytest.raises(ValueError, match="PackedDataset"):
        DataCollatorForPacking(tiny)([dataset[0]])


# --- several training files, sampled by weight ---------------------------------------------------------------------
def _part(tiny, label: str, size: int) -> MultiTurnDataset:
    samples = [conversation(("user", f"{label}{i}"), ("assistant", f"第{i}号")) for i in range(size)]
    return MultiTurnDataset(samples, tiny, None, verbose=False)


def _drawn(sampler, dataset) -> list:
    """How many items of each file one epoch of `sampler` draws."""
    indices = list(sampler)
    assert len(indices) == len(sampler) == len(dataset)
    return [sum(start <= i < start + len(part) for i in indices) for start, part in zip(dataset.offsets, dataset.parts)]


def test_mixed_epochs_follow_the_weights_and_the_seed(tiny, capsys):
    mixed = MixedDataset([_part(tiny, "甲", 40), _part(tiny, "乙", 10)], ["a.jsonl", "b.jsonl"], [3, 1])
    printed = capsys.readouterr().out
    assert "a.jsonl: 每轮 38 条" in printed and "b.jsonl: 每轮 12 条" in printed and "(of 10 in the file, weight 1, 24.0%)" in printed
    # Weight 3:1 of an epoch of 50 items (the files' total): 37.5 -> 38 and 12.5 -> 12.
    assert mixed.counts == [38, 12] and len(mixed) == 50
    sampler = WeightedEpochSampler(mixed, seed=7)
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        assert _drawn(sampler, mixed) == [38, 12]
        indices = list(sampler)
        first = [i for i in indices if i < 40]
        assert len(set(first)) == 38  # fewer than the file holds: no sample twice
        second = [i - 40 for i in indices if i >= 40]
        assert sorted(set(second)) == list(range(10))  # more: the whole file, then a part of it again
        epochs.append(indices)
    assert len({tuple(e) for e in epochs}) == 4  # each epoch its own draw
    assert set().union(*({i for i in e if i < 40} for e in epochs)) == set(range(40))  # other samples in other epochs
    again = WeightedEpochSampler(mixed, seed=7)
    again.set_epoch(2)
    assert list(again) == epochs[2]  # deterministic per seed and epoch (every process of a run draws the same)
    other = WeightedEpochSampler(mixed, seed=8)
    other.set_epoch(2)
    assert list(other) != epochs[2]
    assert mixed[45]["input_ids"] == mixed.parts[1][5]["input_ids"]


def test_several_files_without_weights_are_each_used_once_per_epoch(tiny):
    mixed = MixedDataset([_part(tiny, "甲", 7), _part(tiny, "乙", 3)], ["a", "b"], verbose=False)
    assert mixed.counts == [7, 3]
    assert sorted(WeightedEpochSampler(mixed)) == list(range(10))

    # One file without weights is the file's own dataset, exactly as before.


def test_one_training_file_is_its_own_dataset(tiny, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(conversation(("user", "你好"), ("assistant", "好"))) + "\n", encoding="utf-8")
    single = build_training_set([path], tiny, verbose=False)
    assert type(single) is MultiTurnDataset and len(single) == 1
    weighted = build_training_set([path], tiny, [2.0], verbose=False)
    assert isinstance(weighted, MixedDataset) and weighted.counts == [1]
