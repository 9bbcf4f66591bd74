"""ChatGLM3 as transformers' built-in GLM (`GlmForCausalLM`, model_type "glm"): the same architecture under other
names, loadable by transformers and the engines that support it without any remote code.

Architecture, checked against transformers' modeling_glm.py (5.24): rotary on the first half of each head's
channels in interleaved pairs (GLM's `partial_rotary_factor` 0.5 and its interleaved `rotate_half`), base
10000 * rope_ratio; multi-query attention with `multi_query_group_num` key/value heads; bias on q/k/v only;
RMSNorm before attention and MLP and at the end; SwiGLU with the gate in the first half of one fused
projection (GLM's `gate_up_proj` chunks it the same way). So the weights only change names, and the fused
query_key_value is split into q/k/v.

The tokenizer becomes a `tokenizer.json` (SentencePiece BPE with byte fallback, rebuilt with the `tokenizers`
library) and the chat format a Jinja chat template generated from `conversation`'s constants.
"""
import json
import re

import torch

from chatglm3 import compat
from chatglm3.checkpoint.native import write_weight_files
from chatglm3.errors import ChatGLMError
from chatglm3.model import conversation

# ChatGLM3 key -> GLM key, "{}" standing for the layer number (litgpt's style). None: not stored (GLM computes
# the rotary frequencies from rope_theta); query_key_value is split by QKV_SPLIT.
WEIGHT_MAP = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.rotary_pos_emb.inv_freq": None,
    "transformer.encoder.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "transformer.encoder.layers.{}.self_attention.dense.weight": "model.layers.{}.self_attn.o_proj.weight",
    "transformer.encoder.layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "transformer.encoder.layers.{}.mlp.dense_h_to_4h.weight": "model.layers.{}.mlp.gate_up_proj.weight",
    "transformer.encoder.layers.{}.mlp.dense_4h_to_h.weight": "model.layers.{}.mlp.down_proj.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
# The fused projection holds all query heads, then the key heads, then the value heads.
QKV_SPLIT = {
    f"transformer.encoder.layers.{{}}.self_attention.query_key_value.{kind}": tuple(
        f"model.layers.{{}}.self_attn.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj"))
    for kind in ("weight", "bias")
}
# Upstream's `sop`/`eop` would, as added tokens, match inside ordinary words ("Aesop"); GLM-4's names do not.
TOKEN_NAMES = {"sop": "<sop>", "eop": "<eop>"}


def _generic(key: str) -> tuple[str, str]:
    """"transformer.encoder.layers.3.mlp..." -> ("transformer.encoder.layers.{}.mlp...", "3")."""
    match = re.search(r"\.(\d+)\.", key)
    if match is None:
        return key, ""
    return key[:match.start()] + ".{}." + key[match.end():], match.group(1)


def check_convertible(config) -> None:
    """GLM has no switch for these ChatGLM options; the official ChatGLM3 models have none of them set."""
    unsupported = {
        "rmsnorm": (config.rmsnorm, True),
        "post_layer_norm": (config.post_layer_norm, True),
        "apply_residual_connection_post_layernorm": (config.apply_residual_connection_post_layernorm, False),
        "add_bias_linear": (config.add_bias_linear, False),
    }
    for name, (value, needed) in unsupported.items():
        if bool(value) != needed:
            raise ChatGLMError(f"config.json: {name}={value} 无法转换为 GLM 格式（需要 {needed}）/ "
                               f"cannot convert to the GLM format ({name} must be {needed})")
    if config.pre_seq_len:
        raise ChatGLMError("P-Tuning 前缀无法转换为 GLM 格式 / a P-Tuning prefix cannot be converted to the GLM format")


def convert_state_dict(state_dict: dict, config) -> dict:
    """ChatGLM3 tensors -> GlmForCausalLM tensors: the same tensors renamed; q/k/v are copies (safetensors refuses
    to store views of one tensor under several names)."""
    check_convertible(config)
    q_size = config.num_attention_heads * config.kv_channels
    kv_size = config.num_key_value_groups * config.kv_channels
    converted = {}
    for key, tensor in state_dict.items():
        generic, layer = _generic(key)
        if generic in QKV_SPLIT:
            for name, part in zip(QKV_SPLIT[generic], tensor.split([q_size, kv_size, kv_size], dim=0)):
                converted[name.format(layer)] = part.clone()
        elif generic in WEIGHT_MAP:
            if WEIGHT_MAP[generic] is not None:
                converted[WEIGHT_MAP[generic].format(layer)] = tensor
        else:
            raise ChatGLMError(f"无法映射到 GLM 的张量 / no GLM name for tensor {key}")
    return converted


def glm_config(config, stop_ids: list[int], dtype: torch.dtype) -> dict:
    """config.json of the GlmForCausalLM model, readable by transformers 4.x and 5 (compat.rope_config)."""
    rope_theta = 10000.0 * config.rope_ratio
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_groups,
        "head_dim": config.kv_channels,
        "hidden_act": "silu",
        "attention_bias": bool(config.add_qkv_bias),
        "attention_dropout": config.attention_dropout,
        "rms_norm_eps": config.layernorm_epsilon,
        "max_position_embeddings": config.seq_length,
        **compat.rope_config(rope_theta, partial_rotary_factor=0.5),
        "tie_word_embeddings": False,
        "eos_token_id": stop_ids,
        "pad_token_id": config.pad_token_id,
        "dtype": str(dtype).replace("torch.", ""),
        "torch_dtype": str(dtype).replace("torch.", ""),
        "use_cache": True,
    }


def token_name(token: str) -> str:
    """A ChatGLM special token's name in the exported tokenizer."""
    return TOKEN_NAMES.get(token, token)


def _bpe_merges(sp, vocab: dict) -> list[tuple[str, str]]:
    """SentencePiece BPE first applies the merge whose result scores best; so every split of a piece into two
    pieces is a merge, ranked by the piece's score. Byte and control pieces never result from text."""
    plain = {piece for piece, i in vocab.items() if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))}
    merges = []
    for piece in plain:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in plain and right in plain:
                merges.append((-sp.get_score(vocab[piece]), vocab[piece], vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def build_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` giving our ChatGLMTokenizer's ids: the SentencePiece model's pieces and merges,
    the dummy prefix "▁" before every stretch of text (as each `encode` call adds it), byte fallback, the special
    tokens with their ids, and `[gMASK] <sop>` before a text encoded with special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    sp = tokenizer.tokenizer.sp_model
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    model = Tokenizer(BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=sp.id_to_piece(sp.unk_id()),
                          fuse_unk=True, byte_fallback=True))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    specials = [token_name(t) for t in conversation.SPECIAL_TOKENS]
    # The tokenizers library numbers added tokens after the vocabulary, in order: the ids of ChatGLMTokenizer.
    model.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    prefix = [token_name(t) for t in conversation.PREFIX_TOKENS]
    eos = sp.id_to_piece(sp.eos_id())
    model.post_processor = processors.TemplateProcessing(
        single=" ".join(prefix) + " $A", pair=" ".join(prefix) + f" $A $B:1 {eos}:1",
        special_tokens=[(t, model.token_to_id(t)) for t in prefix] + [(eos, sp.eos_id())])
    return model


def chat_template() -> str:
    """A Jinja chat template giving `conversation.prompt_ids`' ids: `[gMASK]<sop>`, then per message `<|role|>` +
    metadata + "\\n" + " " + content (the space stands for the dummy prefix that encoding the content on its own
    adds; none for empty content), then `<|assistant|>`. A system message's "tools" follow its content as JSON
    (indent 4); the `tools` argument of apply_chat_template is offered first, as `tool_system_message` does."""
    role_tokens = {role: token_name(conversation.role_token(role)) for role in conversation.ROLES}
    tools = conversation.TOOLS_KEY
    return "".join([
        "{%- set role_tokens = " + json.dumps(role_tokens) + " -%}",
        "{{- " + json.dumps("".join(token_name(t) for t in conversation.PREFIX_TOKENS)) + " -}}",
        "{%- if " + tools + " -%}",
        "{%- set messages = [{'role': 'system', 'content': " + json.dumps(conversation.TOOL_SYSTEM_PROMPT) + ", '"
        + tools + "': " + tools + "}] + messages -%}",
        "{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- if message.role not in role_tokens -%}",
        "{{- raise_exception('unknown role ' + message.role + ' (use ' + role_tokens | join(', ') + ')') -}}",
        "{%- endif -%}",
        "{%- set content = message.content or '' -%}",
        "{%- if message.role == 'system' and message." + tools + " is defined -%}",
        "{%- set content = content + '\\n' + message." + tools + " | tojson(indent=4) -%}",
        "{%- endif -%}",
        "{{- role_tokens[message.role] + (message.metadata or '') + '\\n' -}}",
        "{%- if content -%}{{- ' ' + content -}}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- role_tokens['assistant'] -}}{%- endif -%}",
    ])


def save(model, tokenizer, out, max_shard_size="2GB") -> None:
    """Writes `model` (ChatGLMForConditionalGeneration) and `tokenizer` (ChatGLMTokenizer) to the folder `out` as
    a GlmForCausalLM checkpoint: config.json, generation_config.json, safetensors shards with their index,
    tokenizer.json, tokenizer_config.json and the chat template."""
    from transformers import GenerationConfig

    config = model.config
    stop_ids = conversation.stop_token_ids(tokenizer)
    write_weight_files(convert_state_dict(model.state_dict(), config), out, max_shard_size)
    dtype = model.get_input_embeddings().weight.dtype
    _write_json(out / "config.json", glm_config(config, stop_ids, dtype))
    GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    build_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        # The class name every transformers release since 4.x maps to a tokenizer.json.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token,
        "padding_side": "left", "clean_up_tokenization_spaces": False, "model_max_length": config.seq_length,
        "model_input_names": ["input_ids", "attention_mask"],  # not token_type_ids, which generate() rejects
        "chat_template": chat_template(),
    })


def _write_json(path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
