"""LoRA through PEFT: upstream's adapter settings, wrapping the native model for training, and applying a saved
adapter for inference.

Adapters are PEFT's own format (adapter_config.json + adapter_model.safetensors, task type CAUSAL_LM). The native
model keeps upstream's module names (transformer.encoder.layers.N.self_attention.query_key_value), so the tensor
names equal those of an adapter PEFT makes on upstream's remote-code model: adapters from upstream's finetune_demo
load here, and ours load there. PEFT is imported only when LoRA is used (it takes seconds to import).

adapter_config.json is written for PEFT 0.10 and later (`portable_config`): current PEFT writes every field it
knows, and PEFT 0.10 refuses a field it does not (LoraConfig(**fields) raises TypeError), so only the fields 0.10
knows are kept, plus any newer one whose value differs from its default (which older PEFT could not honour anyway).
A field left out takes its default when read back: current PEFT loads the file to the same configuration.
"""
import json
import warnings
from pathlib import Path

from torch import nn

from chatglm3.errors import ChatGLMError
from chatglm3.checkpoint.torch_files import only_safe_torch_load

ADAPTER_CONFIG = "adapter_config.json"
# Upstream's finetune_demo/configs/lora.yaml (r 8, lora_alpha 32, lora_dropout 0.1, no target_modules: PEFT's
# default for model_type chatglm, the fused query/key/value projection). The rank has no default: it turns LoRA on.
DEFAULT_ALPHA = 32
DEFAULT_DROPOUT = 0.1
DEFAULT_TARGET = "query_key_value"
# The fields of PEFT 0.10.0's LoraConfig (peft/config.py's PeftConfigMixin and PeftConfig, and
# peft/tuners/lora/config.py), the oldest PEFT that must read our adapters.
PEFT_0_10_FIELDS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "target_modules", "task_type", "use_dora", "use_rslora",
})


def linear_names(model: nn.Module) -> list[str]:
    """The names LoRA can target: the last component of every linear layer's module path."""
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def parse_targets(value: str) -> list[str]:
    """`query_key_value, dense` -> ["query_key_value", "dense"]."""
    return [item.strip() for item in value.split(",") if item.strip()]


def check_targets(model: nn.Module, targets: list[str]) -> None:
    valid = linear_names(model)
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        raise ChatGLMError(
            f"错误：--lora_target {','.join(unknown) or '（空）'} 不是模型中的线性层；可选 / Error: --lora_target "
            f"{','.join(unknown) or '(empty)'} names no linear layer of the model; valid names: {', '.join(valid)}"
        )


def portable_config(fields: dict) -> dict:
    """An adapter_config.json's fields as PEFT 0.10 reads them (see the module doc): those 0.10 knows, and newer
    ones that differ from current PEFT's defaults."""
    from peft import LoraConfig

    defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=list))  # as written: sets become lists
    missing = object()
    return {key: value for key, value in fields.items()
            if key in PEFT_0_10_FIELDS or defaults.get(key, missing) != value}


def _portable_lora_config(**kwargs):
    """A LoraConfig whose save_pretrained writes portable_config's fields (PEFT writes the file; we trim it)."""
    from peft import LoraConfig

    class PortableLoraConfig(LoraConfig):
        def save_pretrained(self, save_directory, **save_kwargs):
            super().save_pretrained(save_directory, **save_kwargs)
            path = Path(save_directory) / ADAPTER_CONFIG
            fields = portable_config(json.loads(path.read_text(encoding="utf-8")))
            path.write_text(json.dumps(fields, indent=2, sort_keys=True), encoding="utf-8")

    return PortableLoraConfig(**kwargs)


def add_lora(model, rank: int, alpha=None, dropout=None, targets=None, base_path=None):
    """`model` wrapped by PEFT for training: LoRA layers on `targets` (comma-separated layer names), everything
    else frozen; None = upstream's values. `base_path` is recorded in adapter_config.json
    (base_model_name_or_path), where upstream's loaders look for the base."""
    from peft import get_peft_model

    targets = parse_targets(DEFAULT_TARGET if targets is None else targets)
    check_targets(model, targets)
    if base_path is not None:
        model.name_or_path = str(Path(base_path).resolve())
    config = _portable_lora_config(
        task_type="CAUSAL_LM", r=rank, target_modules=targets,
        lora_alpha=DEFAULT_ALPHA if alpha is None else alpha,
        lora_dropout=DEFAULT_DROPOUT if dropout is None else dropout,
    )
    return get_peft_model(model, config)


def is_adapter(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _read_config(path: Path):
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError) as e:  # broken JSON, unknown fields
        raise ChatGLMError(f"{path / ADAPTER_CONFIG}: 无法读取 / cannot be read: {e}") from None
    if config.peft_type != "LORA":
        raise ChatGLMError(f"{path / ADAPTER_CONFIG}: peft_type 为 {config.peft_type}，这里只支持 LoRA / only LoRA adapters are supported here")
    return config


def _saved_keys(path: Path) -> set[str]:
    from peft.utils import load_peft_weights

    with only_safe_torch_load():  # adapter_model.bin is a pickle: the allow-listed loader, one line if refused
        return set(load_peft_weights(str(path), device="cpu"))


def _mismatch(path: Path, error: Exception) -> ChatGLMError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(error).__name__)
    return ChatGLMError(f"{path}: 适配器与基座模型不匹配（基座不同？）/ the adapter does not fit this base model (another base?): {reason}")


def load_adapter(model, path):
    """Applies the LoRA adapter in `path` to `model` and returns the model itself (its own class: chat, generate,
    ...), with PEFT's LoRA layers in place of the targeted linear layers. Unmerged, so logits equal training's."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    if not path.is_dir():
        raise ChatGLMError(f"找不到 LoRA 适配器目录 / LoRA adapter folder not found: {path}")
    if not is_adapter(path):
        raise ChatGLMError(
            f"{path}: 缺少 {ADAPTER_CONFIG}，不是 LoRA 适配器（完整模型目录请用 --model）/ no {ADAPTER_CONFIG}: not a "
            "LoRA adapter (a complete model folder is passed with --model)"
        )
    config = _read_config(path)
    saved = _saved_keys(path)
    try:
        with warnings.catch_warnings():  # PEFT warns of missing keys; the check below makes that an error
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, str(path), config=config)
    except (RuntimeError, ValueError, KeyError) as e:
        raise _mismatch(path, e) from None
    expected = set(get_peft_model_state_dict(peft_model))
    if saved != expected:
        extra = sorted(saved - expected) or sorted(expected - saved)
        raise ChatGLMError(
            f"{path}: 适配器的张量与模型不符（层数不同？）/ the adapter's tensors do not match the model's (another number "
            f"of layers?): {len(saved ^ expected)} differ, e.g. {extra[0]}"
        )
    return peft_model.get_base_model()



def merge(model):
    """`model` as load_adapter returns it, with every LoRA layer's update added into its base weight and the plain
    linear layer put back: no PEFT left, the tensor names of the base (what scripts/export.py writes out)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model
