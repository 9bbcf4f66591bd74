"""ChatGLM3's tokenizer: a SentencePiece model plus nine special tokens, id-for-id equal to upstream.

Upstream (THUDM/chatglm3-6b `tokenization_chatglm.py`) stopped loading on newer transformers; this is a
rewrite that relies only on the public slow-tokenizer API (`transformers.PreTrainedTokenizer`).

Behaviour kept from upstream, on purpose:
- The nine special tokens (chatglm3.model.conversation.SPECIAL_TOKENS) get the ids n, n+1, ... after the
  SentencePiece vocabulary of size n.
- Text is handed to SentencePiece as is: a role token written inside a message is ordinary text, never the
  special token (unless `encode_special_tokens=True`, upstream's opt-in). The SentencePiece dummy prefix "▁" is added
  as the model says, so `encode("皮卡丘")` starts with the id of "▁".
- `encode(text)` prepends `[gMASK] sop`; eos is the SentencePiece eos (`</s>`), pad is `<unk>` (id 0).
- `remove_space` and `do_lower_case` in tokenizer_config.json are accepted and, as upstream, have no effect.

Deliberate differences:
- `build_chat_input` returns `input_ids` and `attention_mask` only; the model derives position ids from the
  attention mask, so `model.generate(**inputs)` works.
- `decode(..., skip_special_tokens=True)` also drops the nine ChatGLM tokens (upstream only dropped eos/pad).
"""
import os
import re
import shutil

import sentencepiece
from transformers import BatchEncoding, PreTrainedTokenizer

from chatglm3.model import conversation

from chatglm3 import hub

from chatglm3 import json_files
from chatglm3.model.conversation import SPECIAL_TOKENS
from chatglm3.errors import ChatGLMError

VOCAB_FILE = "tokenizer.model"
# Keys of upstream's tokenizer_config.json that mean nothing here (auto_map points at remote code we replace).
_IGNORED_CONFIG_KEYS = ("auto_map", "name_or_path", "tokenizer_file")


class SPTokenizer:
    """The SentencePiece model and the special tokens appended after it (upstream's `SPTokenizer`)."""

    def __init__(self, model_path: str):
        if not model_path or not os.path.isfile(model_path):
            raise ChatGLMError(f"错误：找不到分词器文件 {model_path} / Error: tokenizer file {model_path} not found")
        try:
            self.sp_model = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            raise ChatGLMError(
                f"错误：{model_path} 不是有效的 SentencePiece 模型 / Error: {model_path} is not a valid SentencePiece model ({e})"
            ) from None
        self.sp_size = self.sp_model.vocab_size()
        self.bos_id = self.sp_model.bos_id()
        self.eos_id = self.sp_model.eos_id()
        self.pad_id = self.sp_model.unk_id()
        if self.eos_id < 0:
            raise ChatGLMError(
                f"错误：{model_path} 没有 eos 符号 / Error: {model_path} has no eos piece "
                "(train SentencePiece with eos_id >= 0, e.g. the default 2)"
            )
        self.special_tokens = {token: self.sp_size + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {i: token for token, i in self.special_tokens.items()}
        self.n_words = self.sp_size + len(SPECIAL_TOKENS)
        self._special_re = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

    def encode(self, text: str) -> list[int]:
        try:
            return self.sp_model.encode(text)
        except RuntimeError:  # SentencePiece's "Unable to cast" for a lone surrogate: say what it is
            json_files.check_unicode(text, "分词的文本 / the text to tokenize")
            raise

    def tokenize(self, text: str, encode_special_tokens: bool = False) -> list[str]:
        if not text.isascii():  # SentencePiece's error for a lone surrogate says nothing useful
            json_files.check_unicode(text, "分词的文本 / the text to tokenize")
        if not encode_special_tokens:
            return self.sp_model.encode_as_pieces(text)
        pieces, start = [], 0
        for match in self._special_re.finditer(text):
            if start < match.start():
                pieces.extend(self.sp_model.encode_as_pieces(text[start:match.start()]))
            pieces.append(match.group())
            start = match.end()
        if start < len(text):
            pieces.extend(self.sp_model.encode_as_pieces(text[start:]))
        return pieces

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Special tokens become their text; bos/eos/pad and ids outside the vocabulary (e.g. the model's padded
        vocab rows) become nothing, as upstream's id->token mapping made them empty."""
        text, buffer = [], []
        for i in ids:
            i = int(i)
            if i in self.index_special_tokens:
                if buffer:
                    text.append(self.sp_model.decode(buffer))
                    buffer = []
                if not skip_special_tokens:
                    text.append(self.index_special_tokens[i])
            elif 0 <= i < self.sp_size and i not in (self.bos_id, self.eos_id, self.pad_id):
                buffer.append(i)
        if buffer:
            text.append(self.sp_model.decode(buffer))
        return "".join(text)

    def token_to_id(self, token: str) -> int:
        # Special tokens first, as upstream (the real vocabulary has no piece with these names).
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        if index in (self.eos_id, self.bos_id, self.pad_id) or index < 0 or index >= self.sp_size:
            return ""
        return self.sp_model.id_to_piece(index)


def _check_json_object(file: str) -> None:
    """transformers reads tokenizer_config.json with no check: a broken one would be a traceback deep inside it."""
    if os.path.lexists(file):
        json_files.read_json(file)


def names_chatglm_tokenizer(name_or_path, kwargs: dict) -> bool:
    """Whether the tokenizer_config.json of a folder (or Hub id) names ChatGLMTokenizer, i.e. whether
    AutoTokenizer should give ours. A local file is read with our checks (a broken one is one line); for a Hub
    id transformers' own lookup is asked, as AutoTokenizer would, and any failure leaves the choice to it."""
    path = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if path is None:
        return False
    if os.path.isdir(path):
        file = os.path.join(path, "tokenizer_config.json")
        config = json_files.read_json(file) if os.path.lexists(file) else {}
    else:
        try:
            from transformers.models.auto.tokenization_auto import get_tokenizer_config

            wanted = ("cache_dir", "revision", "token", "local_files_only", "subfolder", "force_download", "proxies")
            config = get_tokenizer_config(path, **{k: v for k, v in kwargs.items() if k in wanted})
        except Exception:  # not on the Hub, offline, ...: transformers says so itself
            return False
    return str(config.get("tokenizer_class") or "").removesuffix("Fast") == "ChatGLMTokenizer"


class ChatGLMTokenizer(PreTrainedTokenizer):
    """ChatGLM3 tokenizer: `ChatGLMTokenizer.from_pretrained(dir)` reads `dir/tokenizer.model` (any
    SentencePiece model) and `dir/tokenizer_config.json` if present."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, padding_side="left", clean_up_tokenization_spaces=False, encode_special_tokens=False, **kwargs):
        for key in _IGNORED_CONFIG_KEYS:
            kwargs.pop(key, None)
        if not vocab_file:
            raise ChatGLMError(
                f"错误：没有找到 {VOCAB_FILE}（请传入 ChatGLM3 模型或分词器的本地目录）/ Error: no {VOCAB_FILE} found "
                "(pass the local directory of the ChatGLM3 model or its tokenizer)"
            )
        self.name = "GLMTokenizer"
        self.vocab_file = vocab_file
        self.tokenizer = SPTokenizer(vocab_file)
        self.encode_special_tokens = encode_special_tokens
        self.remove_space = kwargs.pop("remove_space", False)
        self.do_lower_case = kwargs.pop("do_lower_case", False)
        self._vocab = None
        sp = self.tokenizer.sp_model
        # eos/unk/pad are pieces of the SentencePiece model itself; give transformers their real names.
        kwargs["eos_token"] = sp.id_to_piece(self.tokenizer.eos_id)
        kwargs["unk_token"] = sp.id_to_piece(self.tokenizer.pad_id)
        kwargs["pad_token"] = sp.id_to_piece(self.tokenizer.pad_id)
        kwargs.pop("bos_token", None)
        kwargs.setdefault("model_max_length", 10**30)
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            encode_special_tokens=encode_special_tokens,
            remove_space=self.remove_space,
            do_lower_case=self.do_lower_case,
            **kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):  # a Hub id: the Hugging Face cache, or downloaded (AutoTokenizer's options kept)
            path = pretrained_model_name_or_path = hub.resolve(
                path, need="tokenizer", revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
                local_files_only=kwargs.get("local_files_only", False))
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, VOCAB_FILE)):
            raise ChatGLMError(
                f"错误：目录 {path} 中没有 {VOCAB_FILE} / Error: {path} has no {VOCAB_FILE} "
                "(pass the ChatGLM3 model or tokenizer directory)"
            )
        if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".")):
            raise ChatGLMError(f"错误：找不到分词器目录 {path} / Error: tokenizer directory {path} not found")
        if os.path.isdir(path):
            # Check the file here: transformers 4.x turns errors inside __init__ into an unrelated protobuf ImportError.
            SPTokenizer(os.path.join(path, VOCAB_FILE))
            _check_json_object(os.path.join(path, "tokenizer_config.json"))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as e:  # not a local directory and not downloadable (e.g. offline)
            raise ChatGLMError(
                f"错误：无法加载分词器 {path}（不是本地目录，也无法下载），请传入包含 tokenizer.model 的目录 / Error: cannot "
                f"load the tokenizer {path}: not a local directory and not downloadable; pass a directory holding "
                f"tokenizer.model ({e})"
            ) from None

    # --- vocabulary -------------------------------------------------------------------------------------------
    def get_command(self, token: str) -> int:
        """Id of a special token: one of SPECIAL_TOKENS, or "<bos>", "<eos>", "<pad>", "<unk>"."""
        named = {"<bos>": self.tokenizer.bos_id, "<eos>": self.tokenizer.eos_id, "<pad>": self.tokenizer.pad_id, "<unk>": self.tokenizer.pad_id}
        if token in named:
            return named[token]
        if token not in self.tokenizer.special_tokens:
            raise ChatGLMError(f"{token!r} 不是 ChatGLM 特殊符号 / is not a ChatGLM special token (one of {SPECIAL_TOKENS})")
        return self.tokenizer.special_tokens[token]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_words

    def __len__(self) -> int:
        return self.tokenizer.n_words

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            sp = self.tokenizer.sp_model
            vocab = {sp.id_to_piece(i): i for i in range(self.tokenizer.sp_size)}
            vocab.update(self.tokenizer.special_tokens)
            self._vocab = vocab
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return self.tokenizer.tokenize(text, encode_special_tokens=self.encode_special_tokens)

    def tokenize(self, text, **kwargs):
        # Bypass transformers' added-token splitting: text goes to SentencePiece untouched, as upstream did
        # for everything a conversation contains.
        return self._tokenize(text)

    def _convert_token_to_id(self, token):
        return self.tokenizer.token_to_id(token)

    def _convert_id_to_token(self, index):
        return self.tokenizer.id_to_token(index)

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return self._convert_id_to_token(ids)
        skip = self._skip_ids() if skip_special_tokens else set()
        return [self._convert_id_to_token(int(i)) for i in ids if int(i) not in skip]

    def _skip_ids(self) -> set[int]:
        t = self.tokenizer
        return set(t.index_special_tokens) | {t.bos_id, t.eos_id, t.pad_id}

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text, buffer = [], []
        for token in tokens:
            if token in self.tokenizer.special_tokens:
                text.append(self.tokenizer.sp_model.decode_pieces(buffer))
                text.append(token)
                buffer = []
            elif token:
                buffer.append(token)
        text.append(self.tokenizer.sp_model.decode_pieces(buffer))
        return "".join(text)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not os.path.isdir(save_directory):
            raise ChatGLMError(f"错误：{save_directory} 不是目录 / Error: {save_directory} is not a directory")
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)

    # --- special tokens around sequences ----------------------------------------------------------------------
    def get_prefix_tokens(self) -> list[int]:
        return [self.get_command(token) for token in conversation.PREFIX_TOKENS]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.get_command("<eos>")]
        return ids

    def num_special_tokens_to_add(self, pair=False):
        return 3 if pair else 2

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            skip = self._skip_ids()
            return [1 if i in skip else 0 for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- chat format (upstream's methods; the format itself is chatglm3.model.conversation's) ------------------------
    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        return conversation.encode_message(self, role, metadata, message)

    def build_chat_input(self, query: str, history=None, role: str = "user") -> BatchEncoding:
        input_ids = conversation.prompt_ids(self, history or [], query, role)
        return BatchEncoding({"input_ids": [input_ids], "attention_mask": [[1] * len(input_ids)]}, tensor_type="pt")
