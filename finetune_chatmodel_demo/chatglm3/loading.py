"""The one loading path of every script, of training and of resuming: tokenizer, base or fine-tuned model,
P-Tuning v2 prefix, device and dtype. Sits above model, tokenizer and checkpoint (none of them imports it)."""
from pathlib import Path

import torch

from . import conversation, hub, lora, memory
from .checkpoint import PREFIX_KEY, iter_tensors, parse_dtype, read_config, weight_files
from .errors import ChatGLMError
from .model import ChatGLMForConditionalGeneration
from .tokenizer import ChatGLMTokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(value, device) -> torch.dtype:
    """A dtype or its name (float32, fp16, bf16, ...); None: bf16 where the GPU has it, fp16 on older GPUs,
    float32 on CPU."""
    if value is not None:
        return parse_dtype(value)
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def read_ptuning_config(path) -> dict:
    """`pre_seq_len` / `prefix_projection` from a P-Tuning checkpoint's config.json, if it has one."""
    if not (Path(path) / "config.json").is_file():
        return {}
    data = read_config(Path(path))
    return {k: data[k] for k in ("pre_seq_len", "prefix_projection") if data.get(k) is not None}


def load_ptuning_checkpoint(model, path):
    """Loads a P-Tuning v2 checkpoint (upstream's, or one of finetune.py's, also when resuming):
    `transformer.prefix_encoder.*` from its weight files into `model.transformer.prefix_encoder`, strictly."""
    pt_path = Path(path)
    if not pt_path.is_dir():
        raise ChatGLMError(f"找不到 P-Tuning 检查点目录 / P-Tuning checkpoint directory not found: {pt_path}")
    prefix = getattr(model.transformer, "prefix_encoder", None)
    if prefix is None:
        raise ChatGLMError(f"{pt_path}: 模型没有前缀编码器（未设置 pre_seq_len）/ the model has no prefix encoder: load it with pre_seq_len set")
    state = {}
    for file in weight_files(pt_path):
        for key, tensor in iter_tensors(file):
            if key.startswith(PREFIX_KEY):
                state[key[len(PREFIX_KEY):]] = tensor
    if not state:
        raise ChatGLMError(f"{pt_path}: 不含 {PREFIX_KEY}* 张量，不是 P-Tuning 检查点 / holds no {PREFIX_KEY}* tensors: not a P-Tuning checkpoint")
    expected = prefix.state_dict()
    if set(state) != set(expected):
        raise ChatGLMError(
            f"{pt_path}: 前缀编码器的张量 {sorted(state)} 与模型的 {sorted(expected)} 不符（prefix_projection 不一致？）/ "
            "prefix encoder tensors do not match the model's (prefix_projection differs?)"
        )
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ChatGLMError(
                f"{pt_path}: {PREFIX_KEY}{key} 形状 {tuple(tensor.shape)}，模型为 {tuple(expected[key].shape)}（pre_seq_len 或模型尺寸不一致）/ "
                f"shape {tuple(tensor.shape)} does not match the model's {tuple(expected[key].shape)} (pre_seq_len or model size differs)"
            )
    prefix.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model


def check_checkpoint_kinds(pt_checkpoint=None, adapter=None) -> None:
    """A LoRA adapter passed as a P-Tuning checkpoint, or the other way round: one line naming the right flag."""
    if pt_checkpoint is not None and adapter is not None:
        raise ChatGLMError("--pt-checkpoint 与 --adapter 只能选一个 / pass either --pt-checkpoint or --adapter, not both")
    if pt_checkpoint is not None and lora.is_adapter(pt_checkpoint):
        raise ChatGLMError(f"{pt_checkpoint}: 这是 LoRA 适配器，请用 --adapter 加载 / this is a LoRA adapter: load it with --adapter")
    if adapter is not None and read_ptuning_config(adapter).get("pre_seq_len"):
        raise ChatGLMError(f"{adapter}: 这是 P-Tuning v2 检查点，请用 --pt-checkpoint 加载 / this is a P-Tuning v2 checkpoint: "
                           "load it with --pt-checkpoint")


def load_tokenizer(path) -> ChatGLMTokenizer:
    """From a folder, or a Hub id (the Hugging Face cache, or downloaded)."""
    path = hub.resolve(path, need="tokenizer")
    if not (Path(path) / "tokenizer.model").is_file():
        raise ChatGLMError(
            f"{path}: 找不到 tokenizer.model / tokenizer.model not found (pass the ChatGLM3 model directory, or --tokenizer DIR)"
        )
    return ChatGLMTokenizer.from_pretrained(str(path))


def _prefix_settings(pt_checkpoint, pre_seq_len, prefix_projection) -> dict:
    """pre_seq_len/prefix_projection from the flags and the P-Tuning checkpoint's config.json, which must agree."""
    flags = {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection}
    saved = read_ptuning_config(pt_checkpoint) if pt_checkpoint is not None else {}
    for name, flag in flags.items():
        if flag is not None and name in saved and flag != saved[name]:
            raise ChatGLMError(f"{Path(pt_checkpoint) / 'config.json'}: {name}={saved[name]}，与参数 {flag} 不一致 / disagrees with the flag ({flag})")
    settings = {**saved, **{k: v for k, v in flags.items() if v is not None}}
    if pt_checkpoint is not None and not settings.get("pre_seq_len"):
        raise ChatGLMError(f"{pt_checkpoint}: 无法确定 pre_seq_len（没有 config.json）/ cannot tell pre_seq_len (no config.json): pass --pt-pre-seq-len")
    return settings if settings.get("pre_seq_len") else {}


def load_model(model_path, tokenizer, pt_checkpoint=None, pre_seq_len=None, prefix_projection=None, device=None, dtype=None,
               adapter=None):
    """Base or full fine-tuned model (with a P-Tuning v2 prefix when pre_seq_len or pt_checkpoint is given, or a
    LoRA adapter), checked against `tokenizer`, in eval mode; generate() stops where a chat reply ends."""
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ChatGLMError(f"没有可用的 CUDA GPU / no CUDA GPU is available (device={device}): use --device cpu")
    check_checkpoint_kinds(pt_checkpoint, adapter)
    settings = _prefix_settings(pt_checkpoint, pre_seq_len, prefix_projection)
    dtype = resolve_dtype(dtype, device)
    # Refused before anything is allocated when the weights alone cannot fit (chatglm3.memory).
    memory.check_fits(str(model_path), memory.model_parameters(hub.resolve(model_path)) * dtype.itemsize, device)
    model = ChatGLMForConditionalGeneration.from_pretrained(model_path, dtype=dtype, device=device, **settings)
    if pt_checkpoint is not None:
        load_ptuning_checkpoint(model, pt_checkpoint)
    if adapter is not None:
        model = lora.load_adapter(model, adapter)
    if len(tokenizer) > model.config.padded_vocab_size:
        raise ChatGLMError(
            f"{tokenizer.name_or_path}: 分词器有 {len(tokenizer)} 个词，超过模型词表 {model.config.padded_vocab_size} / tokenizer has "
            f"{len(tokenizer)} tokens, more than the model's vocabulary ({model.config.padded_vocab_size}): wrong --tokenizer?"
        )
    model.stop_token_ids = conversation.stop_token_ids(tokenizer)
    return model.eval()


def input_files(model_path, tokenizer_path=None, pt_checkpoint=None, adapter=None) -> list:
    """(flag, file) for every file of the local folders loading reads from (model, tokenizer, prefix, adapter),
    for chatglm3.safe_io.check_outputs: a script's output may not overwrite one of them. Every file, not a list of
    names: a checkpoint folder also holds trainer_state.json, the optimizer, generation_config.json, ... that a
    resume or upstream's tools read. Hub ids are skipped."""
    folders = {"--model": model_path, "--tokenizer": tokenizer_path or model_path, "--pt-checkpoint": pt_checkpoint,
               "--adapter": adapter}
    return [(flag, file) for flag, folder in folders.items() if folder is not None and Path(folder).is_dir()
            for file in sorted(Path(folder).iterdir()) if file.is_file()]


def load_model_and_tokenizer(model_path, tokenizer_path=None, pt_checkpoint=None, pre_seq_len=None, prefix_projection=None, device=None, dtype=None,
                             adapter=None):
    """(model, tokenizer) for inference; the P-Tuning checkpoint's config.json supplies pre_seq_len and
    prefix_projection, and a flag that disagrees is an error."""
    tokenizer = load_tokenizer(tokenizer_path or model_path)
    model = load_model(model_path, tokenizer, pt_checkpoint, pre_seq_len, prefix_projection, device, dtype, adapter)
    return model, tokenizer
