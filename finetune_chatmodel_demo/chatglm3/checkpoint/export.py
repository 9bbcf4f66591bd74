"""Exporting a complete model folder: a base or full fine-tuning checkpoint, optionally with a LoRA adapter merged
into its weights, in upstream's ChatGLM3 layout (the layout of a full fine-tuning checkpoint) or as transformers'
built-in GLM (`hf_glm`). The folder is written next to its destination under a temporary name and renamed at
the end, so a failed export leaves nothing behind."""
import os
import shutil
from pathlib import Path

from chatglm3.checkpoint import gguf, hf_glm, lora
from chatglm3.checkpoint.loading import load_model_and_tokenizer, read_ptuning_config
from chatglm3.checkpoint.native import parse_dtype, read_config
from chatglm3.compat import config_dtype
from chatglm3.data import train_format
from chatglm3.errors import ChatGLMError
from chatglm3.model.configuration import ChatGLMConfig

FORMATS = ("chatglm", "hf-glm", "gguf")
PTUNING_CANNOT_MERGE = (
    "P-Tuning v2 的前缀是每层注意力前额外的键值，不是对权重的修改，无法合并进模型；请用 inference.py --pt-checkpoint DIR"
    "（或 api_server.py 的同名参数）加载 / a P-Tuning v2 prefix is extra keys and values in front of every layer's "
    "attention, not a change of any weight, so it cannot be merged: serve it with inference.py --pt-checkpoint DIR "
    "(or api_server.py's flag of the same name)"
)
ADAPTER_CONFIG = "adapter_config.json"


def _check_folder(path: Path, zh: str, en: str) -> None:
    if not path.is_dir():
        raise ChatGLMError(f"找不到{zh}目录 / {en} folder not found: {path}")
    if read_ptuning_config(path).get("pre_seq_len"):
        raise ChatGLMError(f"{path}: 这是 P-Tuning v2 检查点 / this is a P-Tuning v2 checkpoint. {PTUNING_CANNOT_MERGE}")


def check_export_folders(model_dir: Path, adapter_dir, out: Path, force: bool, tokenizer_dir=None) -> None:
    """Everything that can be told before loading: folders exist, none is P-Tuning, the output is free."""
    _check_folder(model_dir, "模型", "model")
    if (model_dir / ADAPTER_CONFIG).is_file():
        raise ChatGLMError(f"{model_dir}: 这是 LoRA 适配器，请用 --adapter 传入，--model 传基座 / this is a LoRA adapter: pass it as --adapter and its base as --model")
    if adapter_dir is not None:
        _check_folder(adapter_dir, "适配器", "adapter")
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise ChatGLMError(f"{adapter_dir}: 缺少 {ADAPTER_CONFIG}，不是 LoRA 适配器 / no {ADAPTER_CONFIG}: not a LoRA adapter (PEFT format)")
    # --force replaces --output: it may hold no input, the tokenizer folder included.
    for source in filter(None, (model_dir, adapter_dir, Path(tokenizer_dir) if tokenizer_dir is not None else None)):
        if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
            raise ChatGLMError(f"{out}: 输出目录包含输入 {source}，不能覆盖 / the output folder holds the input {source}: choose another --output")
    if out.exists() and not out.is_dir():
        raise ChatGLMError(f"{out}: 已存在且不是目录 / exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ChatGLMError(f"{out}: 目录非空；加 --force 覆盖 / the folder is not empty: pass --force to replace it")


def merge_lora(model, adapter_dir: Path):
    """`model` with the LoRA adapter's low-rank updates added into its weights; chatglm3.checkpoint.lora applies the adapter
    with the checks of every --adapter (LoRA only, same base, same layers) and folds it in."""
    return lora.merge(lora.load_adapter(model, adapter_dir))


def write_model(model, tokenizer, folder: Path, fmt: str, max_shard_size, gguf_type=None, name="model") -> None:
    if fmt == "gguf":
        gguf.write(model, tokenizer, folder, gguf_type, name)
        return
    if fmt == "hf-glm":
        hf_glm.save(model, tokenizer, folder, max_shard_size=max_shard_size)
        return
    model.save_pretrained(folder, max_shard_size=max_shard_size)  # records the dtype written (compat.record_dtype)
    tokenizer.save_pretrained(str(folder))


def export(model_dir, out, fmt: str = "chatglm", adapter_dir=None, dtype=None, force: bool = False,
           max_shard_size="2GB", tokenizer_dir=None, gguf_type=None) -> Path:
    """Writes the model folder `out`; `dtype` defaults to the checkpoint's own (config.json), else float32;
    the tokenizer comes from `tokenizer_dir`, else from `model_dir`. gguf: `out` holds `<out name>-<gguf_type>.gguf`
    and an Ollama Modelfile (chatglm3.checkpoint.gguf)."""
    if fmt not in FORMATS:
        raise ChatGLMError(f"未知格式 / unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if gguf_type is not None and fmt != "gguf":
        raise ChatGLMError("--gguf-type 只用于 --format gguf / --gguf-type is for --format gguf only")
    model_dir, out = Path(model_dir), Path(out)
    adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
    if fmt == "gguf":
        gguf_type = gguf.parse_type(gguf_type)
        if any(read_ptuning_config(d).get("pre_seq_len") for d in filter(None, (model_dir, adapter_dir)) if d.is_dir()):
            raise ChatGLMError(f"{adapter_dir or model_dir}: 这是 P-Tuning v2 检查点 / this is a P-Tuning v2 checkpoint. "
                               f"{gguf.PTUNING_NOT_GGUF}")
    check_export_folders(model_dir, adapter_dir, out, force, tokenizer_dir)
    config = read_config(model_dir)
    if fmt == "hf-glm":
        hf_glm.check_convertible(ChatGLMConfig.from_dict(config))
    if fmt == "gguf":
        gguf.check_convertible(ChatGLMConfig.from_dict(config))
    dtype = parse_dtype(dtype or config_dtype(config) or "float32")
    model, tokenizer = load_model_and_tokenizer(model_dir, tokenizer_path=tokenizer_dir, device="cpu", dtype=dtype)
    if adapter_dir is not None:
        model = merge_lora(model, adapter_dir)
        fmt_trained = train_format.recorded(None, adapter=adapter_dir)
        if fmt_trained is not None:  # the merged model is asked the way its adapter was trained
            train_format.record(model, tokenizer, fmt_trained)
    staging = out.parent / f".{out.name}.export-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was killed
    try:
        staging.mkdir(parents=True)
        write_model(model, tokenizer, staging, fmt, max_shard_size, gguf_type, out.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as e:  # disk full, no permission
        raise ChatGLMError(f"{out}: 写入失败 / cannot write the export: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
