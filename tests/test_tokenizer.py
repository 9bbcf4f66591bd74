"""ChatGLMTokenizer against upstream's reference ids (../shared/parity), plus a tiny SentencePiece model trained here."""
import json

import pytest
import sentencepiece
import torch

from chatglm3.errors import ChatGLMError
from chatglm3.model.conversation import SPECIAL_TOKENS
from chatglm3.model.tokenizer import ChatGLMTokenizer


def train_tiny_sentencepiece(directory):
    """A ~400-piece SentencePiece model trained on generated Chinese/English lines, with the real ChatGLM3
    model's settings (BPE, byte fallback, no normalization, whitespace kept, digits split)."""
    names = ["皮卡丘", "妙蛙种子", "小火龙", "杰尼龟", "Pikachu", "Bulbasaur", "Charmander", "Squirtle"]
    types = ["电", "草", "火", "水", "electric", "grass", "fire", "water"]
    lines = [f"{names[i % 8]}的属性是{types[(i * 3) % 8]}，弱点是{types[(i * 5 + 1) % 8]}。Level {i} evolves at {i * 7 % 50}." for i in range(300)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ChatGLMTokenizer.from_pretrained(str(train_tiny_sentencepiece(tmp_path_factory.mktemp("tiny_sp"))))


def test_special_token_ids_match_upstream(real_tokenizer, tokenizer_golden):
    special = tokenizer_golden["special"]
    for token in SPECIAL_TOKENS:
        assert real_tokenizer.get_command(token) == special[token], token
        assert real_tokenizer.convert_tokens_to_ids(token) == special[token], token
    assert real_tokenizer.eos_token_id == special["eos"] == 2
    assert real_tokenizer.pad_token_id == special["pad"] == 0
    assert real_tokenizer.vocab_size == len(real_tokenizer) == special["vocab_size"] == 64798
    assert real_tokenizer.padding_side == "left"


def test_texts_encode_and_decode_like_upstream(real_tokenizer, tokenizer_golden):
    assert len(tokenizer_golden["texts"]) == 10
    for case in tokenizer_golden["texts"]:
        text = case["text"]
        assert real_tokenizer.encode(text, add_special_tokens=False) == case["ids"], text
        assert real_tokenizer.encode(text) == case["ids_with_special"], text
        assert real_tokenizer(text)["input_ids"] == case["ids_with_special"], text
        assert real_tokenizer.decode(case["ids"]) == case["decoded"] == text, text
        assert real_tokenizer.convert_tokens_to_string(real_tokenizer.tokenize(text)) == text, text


def test_special_token_text_in_content_is_plain_text(real_tokenizer):
    # Upstream never turned "<|user|>" written in a message into the role token.
    ids = real_tokenizer.encode("写出 <|assistant|> 和 [gMASK]", add_special_tokens=False)
    assert not set(ids) & {real_tokenizer.get_command(t) for t in SPECIAL_TOKENS}
    message = real_tokenizer.build_single_message("user", "", "<|user|>")
    assert message.count(real_tokenizer.get_command("<|user|>")) == 1 and message[0] == real_tokenizer.get_command("<|user|>")


def test_encode_special_tokens_option_splits_them(shared):
    tok = ChatGLMTokenizer.from_pretrained(str(shared / "chatglm3-tokenizer"), encode_special_tokens=True)
    ids = tok.encode("a<|user|>b", add_special_tokens=False)
    assert tok.get_command("<|user|>") in ids
    assert tok.decode(ids) == "a<|user|>b"


def test_build_chat_input_matches_upstream(real_tokenizer, tokenizer_golden):
    assert len(tokenizer_golden["chat"]) == 3
    for case in tokenizer_golden["chat"]:
        inputs = real_tokenizer.build_chat_input(case["query"], history=case.get("history"), role=case.get("role", "user"))
        assert set(inputs.keys()) == {"input_ids", "attention_mask"}
        assert inputs["input_ids"].shape == (1, len(case["input_ids"]))
        assert inputs["input_ids"][0].tolist() == case["input_ids"], case["query"]
        assert inputs["attention_mask"].dtype == torch.long and inputs["attention_mask"].sum() == len(case["input_ids"])


def test_build_single_message_layout(real_tokenizer):
    ids = real_tokenizer.build_single_message("assistant", "type_chart", "ok")
    sp = real_tokenizer.tokenizer.sp_model
    assert ids == [real_tokenizer.get_command("<|assistant|>")] + sp.encode("type_chart\n") + sp.encode("ok")
    with pytest.raises(ChatGLMError, match="bot"):
        real_tokenizer.build_single_message("bot", "", "hi")
    with pytest.raises(ChatGLMError, match="not a ChatGLM special token"):
        real_tokenizer.get_command("<|bot|>")


def test_decode_renders_special_tokens_and_drops_padding(real_tokenizer):
    hello = real_tokenizer.encode("你好", add_special_tokens=False)
    ids = [0, 0] + real_tokenizer.get_prefix_tokens() + [real_tokenizer.get_command("<|assistant|>")] + hello + [real_tokenizer.eos_token_id]
    assert real_tokenizer.decode(ids) == "[gMASK]sop<|assistant|>你好"
    assert real_tokenizer.decode(ids, skip_special_tokens=True) == "你好"
    # Rows of the model's padded vocabulary (64798..65023) are not tokens; they decode to nothing.
    assert real_tokenizer.decode(hello + [65000]) == "你好"
    assert real_tokenizer.decode(torch.tensor(hello)) == "你好"


def test_batch_left_padding(real_tokenizer):
    texts = ["皮卡丘", "Pokémon GO! 2024年"]
    batch = real_tokenizer(texts, padding=True, return_tensors="pt")
    longest = len(real_tokenizer.encode(texts[1]))
    short = real_tokenizer.encode(texts[0])
    assert batch["input_ids"].shape == (2, longest)
    assert batch["input_ids"][0].tolist() == [0] * (longest - len(short)) + short
    assert batch["attention_mask"][0].tolist() == [0] * (longest - len(short)) + [1] * len(short)
    assert batch["attention_mask"][1].tolist() == [1] * longest
    padded = real_tokenizer.pad({"input_ids": [short]}, pad_to_multiple_of=8, return_tensors="pt")
    assert padded["input_ids"].shape == (1, 8) and padded["input_ids"][0, -len(short):].tolist() == short


def test_save_and_reload_round_trip(real_tokenizer, tokenizer_golden, tmp_path):
    real_tokenizer.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "ChatGLMTokenizer"
    assert (tmp_path / "tokenizer.model").read_bytes() == open(real_tokenizer.vocab_file, "rb").read()
    again = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert len(again) == len(real_tokenizer) and again.padding_side == "left"
    for case in tokenizer_golden["texts"]:
        assert again.encode(case["text"]) == case["ids_with_special"]
    assert again.get_command("<|observation|>") == tokenizer_golden["special"]["<|observation|>"]


def test_upstream_tokenizer_config_keys_are_tolerated(shared, tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(shared / "chatglm3-tokenizer" / "tokenizer.model")
    config = json.loads((shared / "chatglm3-tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}, remove_space=False, encode_special_tokens=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert tok.encode("皮卡丘") == [64790, 64792, 30910, 55350, 55259, 56729]


def test_directory_without_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(ChatGLMError, match="tokenizer.model"):
        ChatGLMTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ChatGLMError, match="not found"):
        ChatGLMTokenizer.from_pretrained(str(tmp_path / "missing"))


def test_unknown_model_name_offline_is_a_clear_error():
    with pytest.raises(ChatGLMError, match="tokenizer.model"):
        ChatGLMTokenizer.from_pretrained("no-such-user/no-such-model", local_files_only=True)


def test_tiny_sentencepiece_model(tiny):
    n = tiny.tokenizer.sp_model.vocab_size()
    assert [tiny.get_command(t) for t in SPECIAL_TOKENS] == list(range(n, n + 9))
    assert tiny.vocab_size == len(tiny) == n + 9
    assert tiny.eos_token_id == tiny.tokenizer.sp_model.eos_id() and tiny.pad_token_id == 0
    text = "🔥 皮卡丘⚡️ used Thunderbolt! 新しい ÅØ\n\n  end"
    ids = tiny.encode(text)
    assert ids[:2] == [n + 1, n + 3]  # [gMASK] sop
    assert 0 not in ids  # byte fallback: nothing is unknown
    assert all(i < n for i in ids[2:])
    assert tiny.decode(ids[2:]) == text
    assert tiny.decode(ids) == "[gMASK]sop" + text


def test_tiny_tokenizer_round_trip_and_chat_input(tiny, tmp_path):
    tiny.save_pretrained(str(tmp_path))
    again = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert again.encode("皮卡丘 Lv.5 🔥") == tiny.encode("皮卡丘 Lv.5 🔥")
    inputs = again.build_chat_input("小火龙？", history=[{"role": "system", "content": "助手", "tools": [{"name": "f"}]}])
    ids = inputs["input_ids"][0].tolist()
    assert ids[:3] == [again.get_command("[gMASK]"), again.get_command("sop"), again.get_command("<|system|>")]
    assert ids[-1] == again.get_command("<|assistant|>")
    # As upstream: a message is decoded as one SentencePiece sequence, so the dummy prefix "▁" of the content
    # after "\n" shows as a space.
    assert again.decode(ids).endswith('"name": "f"\n    }\n]<|user|>\n 小火龙？<|assistant|>')


def test_bad_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ChatGLMError, match="SentencePiece"):
        ChatGLMTokenizer.from_pretrained(str(tmp_path))


# --- the chat format (chatglm3.model.conversation): one layout for training and generation ------------------------------
MULTI_CALL_SAMPLES = [
    {"tools": [{"name": "pokedex_lookup", "parameters": {"name": "string"}}, {"name": "type_chart", "description": "倍率"}],
     "conversations": [
         {"role": "system", "content": "你是宝可梦图鉴。"},
         {"role": "user", "content": "皮卡丘和妙蛙种子是什么属性？"},
         {"role": "tool", "name": "pokedex_lookup", "parameters": {"name": "皮卡丘"}, "observation": {"types": ["电"]}},
         {"role": "tool", "name": "pokedex_lookup", "parameters": {"name": "妙蛙种子", "level": 5}, "observation": "草/毒"},
         {"role": "assistant", "content": "皮卡丘是电属性，妙蛙种子是草/毒属性。"},
         {"role": "user", "content": "电打草几倍？"},
         {"role": "tool", "name": "type_chart", "parameters": {"attack": "电", "defend": ["草", "毒"]}, "observation": {"x": 0.5}},
         {"role": "assistant", "content": "0.5 倍。", "loss": False},
         {"role": "user", "content": "谢谢"},
         {"role": "assistant", "content": "不客气！"},
     ]},
    {"conversations": [{"role": "user", "content": "hi <|user|>"}, {"role": "assistant", "content": "Hello!"},
                       {"role": "observation", "content": "{}"}, {"role": "assistant", "content": "ok"}]},
]


@pytest.mark.parametrize("which", ["real", "tiny"])
def test_prompt_for_every_prefix_equals_the_training_ids(request, which):
    from chatglm3.model.conversation import encode_sample, prompt_ids, sample_to_messages

    tokenizer = request.getfixturevalue("real_tokenizer" if which == "real" else "tiny")
    assistant = tokenizer.get_command("<|assistant|>")
    checked = 0
    for sample in MULTI_CALL_SAMPLES:
        ids, labels = encode_sample(tokenizer, sample)
        messages = sample_to_messages(sample)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = prompt_ids(tokenizer, messages[:k])
            assert prompt == ids[:len(prompt)], (k, message)
            assert prompt[-1] == assistant
            # The same prompt from upstream's (history, query) form, and the reply is learnt exactly when it has loss.
            before = messages[k - 1]
            if "metadata" not in before:
                assert prompt_ids(tokenizer, messages[:k - 1], before["content"], before["role"]) == prompt
            assert (labels[len(prompt)] != -100) == message["loss"]
            checked += 1
    assert checked == 8


def test_tool_calls_format_and_parse_back():
    from chatglm3.model.conversation import format_tool_call, parse_tool_call

    parameters = {"name": "皮卡丘", "level": 5, "tags": ["a", "b"], "shiny": False, "note": "it's \"quoted\"\n"}
    text = format_tool_call(parameters)
    assert text == "```python\ntool_call(name='皮卡丘', level=5, tags=['a', 'b'], shiny=False, note='it\\'s \"quoted\"\\n')\n```"
    assert parse_tool_call(text) == parameters


@pytest.mark.parametrize("text", [
    "tool_call(a=" + "-" * 5000 + "1)",  # RecursionError inside Python's parser
    "tool_call(a=" + "not " * 30000 + "1)",  # MemoryError inside Python's parser
    "tool_call(a=" + "(" * 300 + "1" + ")" * 300 + ")",
    "tool_call(a='" + "x" * 30000 + "')",
    "tool_call(a=1)\x00",
])
def test_pathological_tool_calls_raise_value_error(text):
    from chatglm3.model.conversation import parse_tool_call, process_response

    with pytest.raises(ValueError, match="not a tool call"):
        parse_tool_call(text)
    response, _ = process_response("pokedex_lookup\n" + text, [])
    assert response == {"name": "pokedex_lookup", "content": text}


def test_stop_ids_are_eos_user_and_observation(real_tokenizer, tokenizer_golden):
    from chatglm3.model.conversation import stop_token_ids

    special = tokenizer_golden["special"]
    assert stop_token_ids(real_tokenizer) == [2, special["<|user|>"], special["<|observation|>"]]
