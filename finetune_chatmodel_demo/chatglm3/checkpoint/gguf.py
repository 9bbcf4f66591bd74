"""One GGUF file for llama.cpp, Ollama and LM Studio, written with llama.cpp's own `gguf` package, following
llama.cpp's conventions for ChatGLM3 (its converter's `ChatGLMModel`): architecture `chatglm`, the tensor names of
gguf-py's MODEL_ARCH.CHATGLM (TENSOR_NAMES below, one dict from our checkpoint names), rotary over the first half
of each head in interleaved pairs (llama.cpp's NORM rope), the SentencePiece vocabulary with ChatGLM3's nine
special tokens as control tokens, bos/eos/eot/eom ids and upstream's chat template; an Ollama Modelfile beside it.

f32, f16, bf16 and q8_0 are written here (gguf-py's quantizer); q4_k_m and q5_k_m go through llama.cpp's own
quantizer (llama-cpp-python's `llama_model_quantize`) from an f16 file. Tensors are converted and written one at a
time, so memory stays at the loaded model plus one tensor."""
from pathlib import Path

import numpy as np
import torch

from chatglm3.model.conversation import role_token, stop_token_ids
from chatglm3.errors import ChatGLMError
from chatglm3.progress import Progress

ARCH = "chatglm"
# Ours -> llama.cpp's (gguf-py's tensor_mapping lists the same pairs under "# chatglm"). The rotary inv_freq buffer
# is not written: llama.cpp computes the frequencies from rope.freq_base.
TENSOR_NAMES = {
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
}
LAYER_TENSOR_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.query_key_value.weight": "attn_qkv.weight",
    "self_attention.query_key_value.bias": "attn_qkv.bias",
    "self_attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    # gate and value halves fused, gate first: llama.cpp's SWIGLU without a gate tensor splits ffn_up the same way
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
}
LAYER_PREFIX = "transformer.encoder.layers."
SKIPPED = ("transformer.rotary_pos_emb.inv_freq",)

# --gguf-type: written here (gguf-py), or by llama.cpp's quantizer from an f16 file (its LlamaFileType number).
WRITTEN_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
LLAMA_QUANTIZED = {"q4_k_m": 15, "q5_k_m": 17}  # LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q5_K_M
GGUF_TYPES = tuple(WRITTEN_TYPES) + tuple(LLAMA_QUANTIZED)
# llama.cpp's general.file_type of each written type (gguf.LlamaFileType)
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}

# Upstream's chat template (THUDM/chatglm3-6b tokenizer_config.json). llama.cpp recognises it by "[gMASK]sop"
# (LLM_CHAT_TEMPLATE_CHATGLM_3); a Jinja renderer (llama-cpp-python, LM Studio) gives the same text. The space after
# "\n" is SentencePiece's dummy prefix of the content, so the text tokenises to conversation.prompt_ids.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Ollama's Go template of the same layout (its "tool" role is ChatGLM3's observation).
OLLAMA_TEMPLATE = (
    '[gMASK]sop{{ range .Messages }}{{ if eq .Role "tool" }}<|observation|>{{ else }}<|{{ .Role }}|>{{ end }}\n'
    ' {{ .Content }}{{ end }}<|assistant|>'
)
STOP_ROLES = ("user", "observation")  # besides eos, as conversation.stop_token_ids
# ChatGLM3's own sampling defaults (upstream's chat()).
OLLAMA_PARAMETERS = {"temperature": 0.8, "top_p": 0.8}

PTUNING_NOT_GGUF = (
    "GGUF 只能保存权重，无法表达 P-Tuning v2 的前缀（每层注意力前额外的键值）：请用 inference.py / api_server.py "
    "--pt-checkpoint DIR，或改用 LoRA（finetune_lora.sh）微调后导出 / GGUF holds weights only and cannot express a "
    "P-Tuning v2 prefix (extra keys and values in front of every layer's attention): serve it with inference.py or "
    "api_server.py --pt-checkpoint DIR, or fine-tune with LoRA (finetune_lora.sh) and export that"
)
NEEDS_LLAMA_CPP = (
    "--gguf-type {t} 需要 llama.cpp 的量化器：pip install llama-cpp-python（或导出 f16 后用 llama.cpp 的 llama-quantize）/ "
    "--gguf-type {t} needs llama.cpp's quantizer: pip install llama-cpp-python (or export f16 and run llama.cpp's "
    "llama-quantize)"
)


def parse_type(value) -> str:
    """--gguf-type, case-insensitive (Q4_K_M or q4_k_m); None -> f16."""
    name = (value or "f16").lower()
    if name not in GGUF_TYPES:
        raise ChatGLMError(f"未知的 --gguf-type {value!r}（可选 {', '.join(GGUF_TYPES)}）/ unknown --gguf-type {value!r} "
                           f"(one of {', '.join(GGUF_TYPES)})")
    if name in LLAMA_QUANTIZED:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise ChatGLMError(NEEDS_LLAMA_CPP.format(t=name)) from None
    return name


def file_name(out: Path, gguf_type: str) -> str:
    return f"{out.name}-{gguf_type}.gguf"


def check_convertible(config) -> None:
    """The ChatGLM3 variants llama.cpp's `chatglm` graph computes: RMSNorm, pre-norm residuals, a final norm, no
    biases but the qkv one, heads * head size == hidden size (its attention output is n_embd x n_embd)."""
    where = "config.json"
    if config.pre_seq_len:
        raise ChatGLMError(f"{where}: pre_seq_len={config.pre_seq_len}: {PTUNING_NOT_GGUF}")
    wrong = [f"{name}={getattr(config, name)}" for name, needed in
             (("rmsnorm", True), ("post_layer_norm", True), ("apply_residual_connection_post_layernorm", False),
              ("add_bias_linear", False), ("quantization_bit", 0)) if getattr(config, name) != needed]
    if config.num_attention_heads * config.kv_channels != config.hidden_size:
        wrong.append(f"num_attention_heads*kv_channels={config.num_attention_heads * config.kv_channels} != hidden_size={config.hidden_size}")
    if wrong:
        raise ChatGLMError(f"{where}: llama.cpp 的 chatglm 结构不支持 {', '.join(wrong)} / llama.cpp's chatglm "
                           f"architecture cannot compute a model with {', '.join(wrong)}")


def gguf_name(key: str) -> str:
    if key in TENSOR_NAMES:
        return TENSOR_NAMES[key]
    if key.startswith(LAYER_PREFIX):
        layer, _, rest = key[len(LAYER_PREFIX):].partition(".")
        if rest in LAYER_TENSOR_NAMES:
            return f"blk.{layer}.{LAYER_TENSOR_NAMES[rest]}"
    raise ChatGLMError(f"张量 {key} 在 GGUF 中没有对应 / tensor {key} has no GGUF counterpart (a layout llama.cpp cannot load)")


def vocabulary(tokenizer, n_vocab: int):
    """(tokens, scores, types) for ids 0..n_vocab-1, as llama.cpp's converter builds ChatGLM3's: the SentencePiece
    pieces with their scores and kinds, the nine special tokens as control tokens, [PAD<i>] for the model's padded
    rows."""
    import gguf

    sp_tok = tokenizer.tokenizer
    sp = sp_tok.sp_model
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i < sp_tok.sp_size:
            piece, score = sp.id_to_piece(i), sp.get_score(i)
            kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                    else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                    else gguf.TokenType.NORMAL)
        elif i in sp_tok.index_special_tokens:
            piece, score, kind = sp_tok.index_special_tokens[i], 0.0, gguf.TokenType.CONTROL
        else:
            piece, score, kind = f"[PAD{i}]", 0.0, gguf.TokenType.UNUSED
        tokens.append(piece.encode("utf-8"))
        scores.append(score)
        types.append(int(kind))
    return tokens, scores, types


def _tensor_plan(state: dict, gguf_type: str):
    """[(gguf name, our key, ggml type)]: norms and biases stay f32 (llama.cpp's convention), matrices take
    `gguf_type`, or f16 where their rows are not whole blocks of it."""
    import gguf

    wanted = gguf.GGMLQuantizationType[WRITTEN_TYPES[gguf_type]]
    plan = []
    for key, tensor in state.items():
        if key in SKIPPED:
            continue
        qtype = gguf.GGMLQuantizationType.F32 if tensor.dim() == 1 else wanted
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if tensor.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16
        plan.append((gguf_name(key), key, qtype))
    return plan


def _as_numpy(tensor: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    array = tensor.detach().to("cpu", torch.float32).numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def write_gguf(model, tokenizer, path: Path, gguf_type: str, name: str) -> None:
    """`model` (ours, LoRA merged) as the GGUF file `path` of a type gguf-py writes."""
    import gguf

    config = model.config
    state = model.state_dict()
    plan = _tensor_plan(state, gguf_type)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_context_length(config.seq_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_groups)
    writer.add_layer_norm_rms_eps(config.layernorm_epsilon)
    writer.add_rope_dimension_count(config.kv_channels // 2)  # ChatGLM3 rotates half of each head
    writer.add_rope_freq_base(10000.0 * getattr(config, "rope_ratio", 1))
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, scores, types = vocabulary(tokenizer, config.padded_vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    sp = tokenizer.tokenizer
    writer.add_add_space_prefix(sp.sp_model.encode("a", out_type=str)[0].startswith("\u2581"))
    writer.add_bos_token_id(max(sp.bos_id, 0))
    writer.add_eos_token_id(sp.eos_id)
    writer.add_unk_token_id(sp.pad_id)
    writer.add_pad_token_id(sp.pad_id)
    # A reply ends with eos, <|user|> or <|observation|> (conversation.stop_token_ids): llama.cpp stops at eos, eot, eom.
    stops = stop_token_ids(tokenizer)
    writer.add_eot_token_id(stops[1])
    writer.add_eom_token_id(stops[2])
    writer.add_add_bos_token(False)  # the chat template writes [gMASK] sop itself
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for gname, key, qtype in plan:
        shape = tuple(state[key].shape)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            itemsize = 4 if qtype == gguf.GGMLQuantizationType.F32 else 2
            writer.add_tensor_info(gname, shape, np.dtype(np.float32 if itemsize == 4 else np.float16),
                                   int(np.prod(shape)) * itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with Progress(len(plan), f"{path.name}: 已写张量 / tensors written", unit="tensor") as progress:
        for _, key, qtype in plan:
            writer.write_tensor_data(_as_numpy(state[key], qtype))
            progress.update()
    writer.close()


def quantize_with_llama_cpp(source: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's own quantizer (q4_k_m, q5_k_m), from the f16 file `source`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANTIZED[gguf_type]
    params.nthread = 0  # llama.cpp picks
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise ChatGLMError(f"{target}: llama.cpp 量化失败（见上方日志）/ llama.cpp's quantizer failed (its log is above)")


def modelfile(gguf_file: str, config) -> str:
    """An Ollama Modelfile for `gguf_file` (beside it): ChatGLM3's layout, its stop tokens, upstream's defaults."""
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{OLLAMA_TEMPLATE}"""']
    lines += [f'PARAMETER stop "{role_token(role)}"' for role in STOP_ROLES]
    lines += [f"PARAMETER {key} {value}" for key, value in OLLAMA_PARAMETERS.items()]
    lines.append(f"PARAMETER num_ctx {min(config.seq_length, 8192)}")
    return "\n".join(lines) + "\n"


def write(model, tokenizer, folder: Path, gguf_type: str, name: str) -> Path:
    """Writes `folder/<name>-<type>.gguf` and `folder/Modelfile` (`folder` is export's staging folder); returns the
    GGUF file."""
    target = folder / file_name(Path(name), gguf_type)
    if gguf_type in LLAMA_QUANTIZED:
        f16 = folder / ".f16.gguf.tmp"
        write_gguf(model, tokenizer, f16, "f16", name)
        quantize_with_llama_cpp(f16, target, gguf_type)
        f16.unlink()
    else:
        write_gguf(model, tokenizer, target, gguf_type, name)
    (folder / "Modelfile").write_text(modelfile(target.name, model.config), encoding="utf-8")
    return target


def read_metadata(path) -> dict:
    """The GGUF file's key/values (scalars and strings; arrays by length), for tests and `--format gguf` users."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for field in reader.fields.values():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            out[field.name] = len(field.data)
        else:
            out[field.name] = field.contents()
    return out

