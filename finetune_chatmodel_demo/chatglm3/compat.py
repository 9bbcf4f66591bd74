"""Every difference between the transformers releases this project supports (>= 4.51; tested 4.51.3 and 5.24),
each with the releases it is for. Nothing else in the package or in finetune.py looks at the version."""
import json
import warnings
from pathlib import Path


def config_dtype(config: dict):
    """The weights' dtype recorded in a config.json: `dtype` (written by transformers >= 5) or `torch_dtype`
    (transformers 4.x and the official THUDM files); None when neither."""
    return config.get("dtype") or config.get("torch_dtype")


def record_dtype(config_file: Path, dtype):
    """Write the weights' dtype under both names: `dtype` (read by transformers >= 5) and `torch_dtype` (read by
    transformers 4.x, hence by upstream's remote code)."""
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["dtype"] = data["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def training_argv(argv: list[str], fields) -> list[str]:
    """transformers >= 5 replaced --group_by_length (4.x) by --train_sampling_strategy group_by_length; the old
    flag works on both. `fields`: the training-arguments dataclass fields of the running release."""
    if "--group_by_length" in argv and "group_by_length" not in fields:
        return [a for a in argv if a != "--group_by_length"] + ["--train_sampling_strategy", "group_by_length"]
    return argv


def silence_renamed_flag_warnings():
    """transformers >= 5 warns that --gradient_checkpointing is renamed; take_gradient_checkpointing reads both."""
    warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)


def take_gradient_checkpointing(training_args) -> bool:
    """Whether activation recomputation was asked for (--gradient_checkpointing; on transformers >= 5 also its new
    name --activation_checkpointing), switching the Trainer's own hook off on either release: the model has its
    own non-reentrant switch, which works with a frozen base under P-Tuning."""
    wanted = bool(training_args.gradient_checkpointing or getattr(training_args, "activation_checkpointing", False))
    training_args.gradient_checkpointing = False
    if hasattr(training_args, "activation_checkpointing"):  # transformers >= 5
        training_args.activation_checkpointing = False
    return wanted
