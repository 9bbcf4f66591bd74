"""Reading and writing checkpoints in upstream's format (config.json + safetensors or .bin, sharded or not).

Weights are read one tensor at a time into a model built on the meta device, so the 6B model loads in about
its own size of RAM.
"""
import os
import re
from pathlib import Path
from typing import Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from chatglm3 import compat, hub, json_files
from chatglm3.checkpoint.torch_files import torch_load
from chatglm3.errors import ChatGLMError
from chatglm3.model.configuration import ChatGLMConfig, check_config_dict
from chatglm3.output_files import share_weight_files
from chatglm3.progress import Progress

PREFIX_KEY = "transformer.prefix_encoder."
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
# Arguments that transformers' Auto classes and users' upstream habits pass along; they mean nothing here.
IGNORED_KWARGS = {
    "trust_remote_code", "cache_dir", "revision", "token", "use_auth_token", "local_files_only", "force_download",
    "proxies", "subfolder", "resume_download", "_from_auto", "_from_pipeline", "_commit_hash", "code_revision",
    "low_cpu_mem_usage", "attn_implementation", "use_safetensors", "adapter_kwargs", "output_loading_info",
    "empty_init", "key_mapping",
}


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(value) -> Optional[torch.dtype]:
    """A torch dtype, its name, or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ChatGLMError(f"不支持的 dtype / unsupported dtype: {value!r} (use float32, float16 or bfloat16)")
    return DTYPES[value]


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.exists():
        raise ChatGLMError(f"{config_file}: 缺少 config.json / missing config.json — is {path} a ChatGLM3 checkpoint directory?")
    data = json_files.read_json(config_file, allow_nan=True)  # a NaN field is named by check_config_dict
    check_config_dict(data, config_file)
    if data.get("model_type") != "chatglm":
        raise ChatGLMError(f"{config_file}: model_type 应为 \"chatglm\"，实际为 {data.get('model_type')!r} / field model_type must be \"chatglm\"")
    return data


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files, in the order a loader reads them."""
    for name in WEIGHT_FILES:
        f = path / name
        if not f.exists():
            continue
        if name.endswith(".index.json"):
            weight_map = json_files.read_weight_map(f)
            for shard in dict.fromkeys(weight_map.values()):
                # A shard is a file of this folder: "/dev/zero" or "../x" would read outside it.
                if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                    raise ChatGLMError(f"{f}: 分片名 {shard!r} 不是本目录中的文件名 / lists the shard {shard!r}, which is not "
                                       "a file name in this folder")
            shards = [path / s for s in dict.fromkeys(weight_map.values())]
            for s in shards:
                if not s.is_file():
                    raise ChatGLMError(f"{f}: 列出的分片不存在 / lists a missing shard: {s.name}")
            return shards
        if not f.is_file():
            raise ChatGLMError(f"{f}: 不是普通文件 / is not a regular file")
        return [f]
    raise ChatGLMError(f"{path}: 找不到权重文件 / no weights found (expected one of {', '.join(WEIGHT_FILES)})")


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(file: Path):
    """(key, tensor) read with plain reads, one tensor in memory at a time: no memory map, whose touched pages
    would count in the process's memory until the whole file is done (a quantized load would peak at the file's
    size plus the quantized model)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100 * 2**20:  # safetensors' own bound on the header
            raise ChatGLMError(f"{file}: safetensors 文件头过大，文件已损坏 / the safetensors header is too large: the file is damaged")
        header = json_files.expect(json_files.loads(f.read(size).decode("utf-8", "replace"), str(file)), dict, str(file))
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            f.seek(8 + size + start)
            data = bytearray(end - start)
            f.readinto(data)
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            yield key, (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(info["shape"])


def iter_tensors(file: Path, mapped: bool = True):
    """Yields (key, tensor) one at a time, on CPU; `mapped=False`: safetensors read without a memory map."""
    try:
        if file.suffix == ".safetensors" and not mapped:
            yield from _read_safetensors(file)
        elif file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            # mmap: tensors are paged in as they are copied out, not all at once. The allow-listed loader: a
            # pickle that would run code is one line naming the file.
            state = torch_load(file, mmap=True)
            yield from state.items()
    except ChatGLMError:
        raise
    except Exception as e:  # corrupt or truncated files surface deep inside safetensors/pickle
        raise ChatGLMError(f"{file}: 无法读取权重 / cannot read weights: {e}") from None


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor):
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = tensor


def load_pretrained(cls, path, config: Optional[ChatGLMConfig] = None, torch_dtype=None, dtype=None, device=None, device_map=None, **kwargs):
    """`ChatGLMForConditionalGeneration.from_pretrained` (transformers' Auto classes, users' upstream habits): config
    overrides as keyword arguments (e.g. `pre_seq_len=128`); a prefix encoder missing from the files is freshly
    initialised. The project's scripts go through chatglm3.checkpoint.loading, which calls `load_weights` directly."""
    # A folder, or a Hub id (the Hugging Face cache, or downloaded); AutoModel passes revision/cache_dir/token.
    path = Path(hub.resolve(path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token")))
    config_dict = read_config(path)
    if config is None:
        config = ChatGLMConfig.from_dict(config_dict)
    quantization_bit = None
    for key, value in kwargs.items():
        if key in IGNORED_KWARGS:
            continue
        if key == "quantization_config":
            raise ChatGLMError("请用 quantization_bit=4 或 8 / pass quantization_bit=4 or 8 instead of quantization_config")
        if key == "quantization_bit":  # the scripts' one check: 4 or 8 (3 would otherwise load as 8 bits)
            from chatglm3.checkpoint.quantization import parse_bits

            quantization_bit = parse_bits(value or None, "quantization_bit")  # 0: none, as before
            continue
        if not hasattr(config, key):
            raise ChatGLMError(f"未知参数 / unknown argument for from_pretrained: {key}")
        setattr(config, key, value)
    # Overrides (e.g. pre_seq_len from a flag) are held to config.json's rules, before anything is built.
    overrides = sorted(set(kwargs) - IGNORED_KWARGS)
    check_config_dict(config.to_dict(), f"{path / 'config.json'}" + (f" + {', '.join(overrides)}" if overrides else ""))
    # "auto", as in transformers, is the dtype config.json records, float32 when it records none.
    target_dtype = compat.requested_dtype(dtype, torch_dtype)
    if target_dtype == "auto":
        target_dtype = compat.config_dtype(config_dict)
    target_dtype = parse_dtype(target_dtype) or torch.float32
    if device_map is not None and device is None:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device_map == "auto" else device_map
    return load_weights(cls, path, config, target_dtype, device or "cpu", quantization_bit)


def load_weights(cls, path: Path, config: ChatGLMConfig, dtype: torch.dtype, device, quantization_bit: Optional[int] = None):
    """The model of `config` with the weights of the checkpoint folder `path`, built on the meta device and
    filled one tensor at a time in `dtype` on `device` (a tensor already in `dtype` on the CPU is kept as the
    file's memory map: no copy). With `quantization_bit` the blocks' linear layers are quantized as they are read
    (chatglm3.checkpoint.quantization), so the full-precision weights are never all in memory."""
    device = torch.device(device)
    with torch.device("meta"):
        model = cls(config)
    if quantization_bit:
        from chatglm3.checkpoint import quantization

        quantization.swap_linears(model, quantization_bit, dtype)
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    files = weight_files(path)
    with Progress(len(files), f"{path.name}: 已读权重文件 / weight files read", unit="file") as progress:
        for file in files:
            _load_file(model, file, expected, dtype, device, quantization_bit)
            progress.update()

    missing = [k for k, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    fresh = [k for k in missing if k.startswith(PREFIX_KEY) or k.endswith("inv_freq")]
    really_missing = sorted(set(missing) - set(fresh))
    if really_missing:
        shown = ", ".join(really_missing[:5]) + (" ..." if len(really_missing) > 5 else "")
        raise ChatGLMError(f"{path}: 权重缺少 {len(really_missing)} 个张量 / weights lack {len(really_missing)} tensors: {shown}")
    if fresh:
        _materialise_fresh(model, device)
    if quantization_bit:
        quantization.release_freed_memory()
    return model.eval()


def _load_file(model: nn.Module, file: Path, expected: dict, dtype: torch.dtype, device, quantization_bit) -> None:
    """One weight file's tensors into `model` (built on the meta device), each checked against `expected`."""
    if quantization_bit:
        from chatglm3.checkpoint import quantization
    for key, tensor in iter_tensors(file, mapped=not quantization_bit):
        if key not in expected:
            raise ChatGLMError(f"{file}: 多余的张量 / unexpected tensor {key!r} (not part of a ChatGLM3 model with this config.json)")
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ChatGLMError(f"{file}: 张量 {key} 形状为 {tuple(tensor.shape)}，按 config.json 应为 {tuple(want.shape)} / tensor {key} has shape {tuple(tensor.shape)}, config.json implies {tuple(want.shape)}")
        # The prefix and the rotary buffer stay in float32 (upstream trains the prefix in float32).
        keep_fp32 = key.startswith(PREFIX_KEY) or key.endswith("inv_freq")
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        if quantization_bit and quantization.is_quantized_weight(module, attr):
            quantization.set_weight(module, tensor.to(dtype), device)
            continue
        value = tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
        _set_tensor(model, key, value)


def _materialise_fresh(model: nn.Module, device: torch.device):
    """Initialise what the files did not hold: a new P-Tuning prefix, and the rotary buffer of old files."""
    transformer = model.transformer
    rotary = transformer.rotary_pos_emb
    if rotary.inv_freq.is_meta:
        rotary._buffers["inv_freq"] = rotary.frequencies(device)
    prefix = getattr(transformer, "prefix_encoder", None)
    if prefix is not None and any(p.is_meta for p in prefix.parameters()):
        # torch's default init, as upstream (its _init_weights does nothing for the prefix).
        prefix.to_empty(device=device)
        for m in prefix.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        prefix.float()


def save_pretrained(model, save_directory, state_dict=None, safe_serialization=True, max_shard_size="2GB"):
    """Upstream's layout: config.json, then `model.safetensors` or `model-0000i-of-0000n.safetensors` with
    `model.safetensors.index.json` (`pytorch_model*.bin` when safe_serialization=False)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["ChatGLMForConditionalGeneration"]
    model.config.save_pretrained(out)
    compat.record_dtype(out / "config.json", model.get_input_embeddings().weight.dtype)
    if state_dict is None:
        state_dict = model.state_dict()
    write_weight_files(state_dict, out, max_shard_size, safe_serialization)


def write_weight_files(state_dict: dict, out: Path, max_shard_size="2GB", safe_serialization: bool = True) -> None:
    """`state_dict` as `model.safetensors`, or as shards `model-0000i-of-0000n.safetensors` with their index
    (`pytorch_model*.bin` when safe_serialization=False), one file at a time, with progress."""
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # Stale shards from an earlier save would be picked up by the index-less loaders.
    for old in out.glob("*"):
        if re.fullmatch(r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?|model\.safetensors\.index\.json", old.name):
            old.unlink()

    stem, ext = ("model", "safetensors") if safe_serialization else ("pytorch_model", "bin")
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern=stem + "{suffix}." + ext, max_shard_size=max_shard_size)
    shards = split.filename_to_tensors
    with Progress(len(shards), f"{out.name}: 已写权重文件 / weight files written", unit="file") as progress:
        for name, keys in shards.items():
            shard = {k: state_dict[k] for k in keys}
            if safe_serialization:
                save_file(shard, str(out / name), metadata={"format": "pt"})
            else:
                torch.save(shard, out / name)
            progress.update()
    share_weight_files(out)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / f"{stem}.{ext}.index.json").write_text(json_files.dumps(index, indent=2) + "\n", encoding="utf-8")
