"""The one loading path of every script, of training and of resuming: tokenizer, base or fine-tuned model,
P-Tuning v2 prefix, LoRA adapter, device, dtype and quantization. Sits above model, tokenizer and checkpoint (none
of them imports it).

A load first makes a `LoadPlan`: every name resolved (a Hub id once), config.json and the P-Tuning checkpoint's
config read once, the checkpoint's kind and training format, pre_seq_len, dtype, quantization and the memory it
will take. The scripts then load the tokenizer and the model from the plan. `resolve_dtype` is the one dtype rule
(scripts, launchers and benchmarks)."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from chatglm3 import compat

from chatglm3 import hub
from chatglm3.checkpoint import lora, memory, quantization

from chatglm3.data import train_format
from chatglm3.checkpoint.native import DTYPES, PREFIX_KEY, iter_tensors, load_weights, parse_dtype, read_config, weight_files
from chatglm3.model.configuration import ChatGLMConfig, check_config_dict
from chatglm3.errors import ChatGLMError
from chatglm3.model.modeling import ChatGLMForConditionalGeneration
from chatglm3.model.tokenizer import ChatGLMTokenizer

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # --dtype of every script (export.py: without auto)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX); the one place that asks."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def resolve_dtype(value, device, checkpoint_dtype=None) -> torch.dtype:
    """The one dtype rule. A dtype or its name (float32, bf16, fp16, ...) wins ("auto" and None do not). On CUDA:
    bf16 where the GPU has it, else fp16. On the CPU: the checkpoint's own dtype (`checkpoint_dtype`, what its
    config.json records), a float16 checkpoint read as bf16 (same size; a CPU computes fp16 products several times
    slower, docs/performance.md), float32 when none is recorded."""
    if value is not None and value != "auto":
        return parse_dtype(value)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if DTYPES.get(checkpoint_dtype) in (torch.float16, torch.bfloat16):
        return torch.bfloat16
    return torch.float32


def _folder_config(path) -> dict:
    """A checkpoint folder's config.json ({} when it has none)."""
    return read_config(Path(path)) if (Path(path) / "config.json").is_file() else {}


def _prefix_fields(data: dict) -> dict:
    return {k: data[k] for k in ("pre_seq_len", "prefix_projection") if data.get(k) is not None}


def read_ptuning_config(path) -> dict:
    """`pre_seq_len` / `prefix_projection` from a P-Tuning checkpoint's config.json, if it has one."""
    return _prefix_fields(_folder_config(path))


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


def check_checkpoint_kinds(pt_checkpoint=None, adapter=None, adapter_ptuning_config=None) -> None:
    """A LoRA adapter passed as a P-Tuning checkpoint, or the other way round: one line naming the right flag."""
    if pt_checkpoint is not None and adapter is not None:
        raise ChatGLMError("--pt-checkpoint 与 --adapter 只能选一个 / pass either --pt-checkpoint or --adapter, not both")
    if pt_checkpoint is not None and lora.is_adapter(pt_checkpoint):
        raise ChatGLMError(f"{pt_checkpoint}: 这是 LoRA 适配器，请用 --adapter 加载 / this is a LoRA adapter: load it with --adapter")
    if adapter is not None and (adapter_ptuning_config or {}).get("pre_seq_len"):
        raise ChatGLMError(f"{adapter}: 这是 P-Tuning v2 检查点，请用 --pt-checkpoint 加载 / this is a P-Tuning v2 checkpoint: "
                           "load it with --pt-checkpoint")


def _prefix_settings(pt_checkpoint, saved: dict, pre_seq_len, prefix_projection) -> dict:
    """pre_seq_len/prefix_projection from the flags and the P-Tuning checkpoint's config.json, which must agree."""
    flags = {"pre_seq_len": pre_seq_len, "prefix_projection": prefix_projection}
    for name, flag in flags.items():
        if flag is not None and name in saved and flag != saved[name]:
            raise ChatGLMError(f"{Path(pt_checkpoint) / 'config.json'}: {name}={saved[name]}，与参数 {flag} 不一致 / disagrees with the flag ({flag})")
    settings = {**saved, **{k: v for k, v in flags.items() if v is not None}}
    if pt_checkpoint is not None and not settings.get("pre_seq_len"):
        raise ChatGLMError(f"{pt_checkpoint}: 无法确定 pre_seq_len（没有 config.json）/ cannot tell pre_seq_len (no config.json): pass --pt-pre-seq-len")
    return settings if settings.get("pre_seq_len") else {}


@dataclass(frozen=True)
class LoadPlan:
    """What one load reads and makes, decided before any weight is read (see the module doc)."""
    model_dir: str  # local folder (a Hub id resolved)
    tokenizer_dir: str
    config: dict = field(repr=False)  # the model's config.json
    kind: str  # "base", "full" (a full fine-tuning checkpoint), "ptuning" or "lora"
    pt_checkpoint: Optional[str]
    adapter: Optional[str]
    prefix: dict  # pre_seq_len / prefix_projection for the model's config ({} without P-Tuning)
    train_format: Optional[str]  # what the checkpoint records (chatglm3.data.train_format); None: none recorded
    device: str
    dtype: torch.dtype  # of the weights that are not quantized
    quantization_bit: Optional[int]  # 4 / 8: the blocks' linear layers through bitsandbytes
    parameters: int

    def model_config(self) -> ChatGLMConfig:
        config = ChatGLMConfig.from_dict(self.config)
        for key, value in self.prefix.items():
            setattr(config, key, value)
        return config

    def weight_bytes(self) -> int:
        """What the model's weights will take once loaded (memory.weight_bytes)."""
        return memory.weight_bytes(self.model_config(), self.dtype, self.quantization_bit)


def make_plan(model, tokenizer=None, pt_checkpoint=None, adapter=None, pre_seq_len=None, prefix_projection=None, device=None,
         dtype=None, quantization_bit=None, revision=None, cache_dir=None, label=None) -> LoadPlan:
    """Resolve the names and read the configs once; check the flags against them (one line each)."""
    device = device or default_device()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ChatGLMError(f"没有可用的 CUDA GPU / no CUDA GPU is available (device={device}): use --device cpu")
    options = {"revision": revision, "cache_dir": cache_dir}
    model_dir = hub.resolve(model, label=label, **options)
    tokenizer_dir = model_dir if tokenizer is None else hub.resolve(tokenizer, need="tokenizer", **options)
    config = read_config(Path(model_dir))
    pt_saved = _folder_config(pt_checkpoint) if pt_checkpoint is not None else {}  # read once: prefix and format
    pt_config = _prefix_fields(pt_saved)
    adapter_pt = read_ptuning_config(adapter) if adapter is not None else {}
    check_checkpoint_kinds(pt_checkpoint, adapter, adapter_pt)
    prefix = _prefix_settings(pt_checkpoint, pt_config, pre_seq_len, prefix_projection)
    if prefix:  # the prefix settings are held to config.json's rules (a size of 10^9), before anything is built
        check_config_dict({**config, **prefix}, f"{Path(model_dir) / 'config.json'} + {', '.join(sorted(prefix))}")
    kind = ("ptuning" if pt_checkpoint is not None else "lora" if adapter is not None
            else "full" if config.get(train_format.CONFIG_KEY) else "base")
    fmt = pt_saved.get(train_format.CONFIG_KEY) or \
        (train_format.recorded(None, adapter=adapter) if adapter is not None else None) or config.get(train_format.CONFIG_KEY)
    return LoadPlan(
        model_dir=model_dir, tokenizer_dir=tokenizer_dir, config=config, kind=kind,
        pt_checkpoint=None if pt_checkpoint is None else str(pt_checkpoint),
        adapter=None if adapter is None else str(adapter), prefix=prefix,
        train_format=fmt if fmt in train_format.FORMATS else None, device=str(device),
        dtype=resolve_dtype(dtype, device, compat.config_dtype(config)),
        quantization_bit=quantization.parse_bits(quantization_bit, "--quantization-bit"),
        parameters=memory.parameter_count(ChatGLMConfig.from_dict(config)),
    )


def load_tokenizer(path) -> ChatGLMTokenizer:
    """From a folder, or a Hub id (the Hugging Face cache, or downloaded)."""
    path = hub.resolve(path, need="tokenizer")
    if not (Path(path) / "tokenizer.model").is_file():
        raise ChatGLMError(
            f"{path}: 找不到 tokenizer.model / tokenizer.model not found (pass the ChatGLM3 model directory, or --tokenizer DIR)"
        )
    return ChatGLMTokenizer.from_pretrained(str(path))


def load_model(plan: LoadPlan, tokenizer, check_memory: bool = True, for_training: bool = False):
    """The model the plan describes, checked against `tokenizer`, in eval mode. Generation's stop ids are the
    caller's to pass (chatglm3.model.conversation.stop_token_ids). A 4-bit model on the CPU that is not loaded for
    training gets its weights in the CPU kernel's layout at once (quantization.pack_for_cpu_inference)."""
    if check_memory:  # refused before anything is allocated when the weights alone cannot fit (chatglm3.checkpoint.memory)
        memory.check_fits(plan.model_dir, plan.weight_bytes(), plan.device,
                          cheaper=memory.cheaper_option(plan.dtype, plan.quantization_bit))
    model = load_weights(ChatGLMForConditionalGeneration, Path(plan.model_dir), plan.model_config(), plan.dtype,
                         plan.device, plan.quantization_bit)
    if plan.quantization_bit == 4 and torch.device(plan.device).type == "cpu" and not for_training:
        quantization.pack_for_cpu_inference(model)
    if plan.pt_checkpoint is not None:
        load_ptuning_checkpoint(model, plan.pt_checkpoint)
    if plan.adapter is not None:
        model = lora.load_adapter(model, plan.adapter)
    if len(tokenizer) > model.config.padded_vocab_size:
        raise ChatGLMError(
            f"{tokenizer.name_or_path}: 分词器有 {len(tokenizer)} 个词，超过模型词表 {model.config.padded_vocab_size} / tokenizer has "
            f"{len(tokenizer)} tokens, more than the model's vocabulary ({model.config.padded_vocab_size}): wrong --tokenizer?"
        )
    return model.eval()


def input_files(model_path, tokenizer_path=None, pt_checkpoint=None, adapter=None) -> list:
    """(flag, file) for every file of the local folders loading reads from (model, tokenizer, prefix, adapter),
    for chatglm3.output_files.check_outputs: a script's output may not overwrite one of them. Every file, not a list of
    names: a checkpoint folder also holds trainer_state.json, the optimizer, generation_config.json, ... that a
    resume or upstream's tools read. Hub ids are skipped."""
    folders = {"--model": model_path, "--tokenizer": tokenizer_path or model_path, "--pt-checkpoint": pt_checkpoint,
               "--adapter": adapter}
    return [(flag, file) for flag, folder in folders.items() if folder is not None and Path(folder).is_dir()
            for file in sorted(Path(folder).iterdir()) if file.is_file()]


def load_plan(plan: LoadPlan):
    """(model, tokenizer) from a plan."""
    tokenizer = load_tokenizer(plan.tokenizer_dir)
    return load_model(plan, tokenizer), tokenizer


def load_model_and_tokenizer(model_path, tokenizer_path=None, pt_checkpoint=None, pre_seq_len=None, prefix_projection=None, device=None, dtype=None,
                             adapter=None, quantization_bit=None):
    """(model, tokenizer) for inference; the P-Tuning checkpoint's config.json supplies pre_seq_len and
    prefix_projection, and a flag that disagrees is an error."""
    return load_plan(make_plan(model_path, tokenizer_path, pt_checkpoint, adapter, pre_seq_len, prefix_projection, device,
                          dtype, quantization_bit))
