"""Every difference between the transformers releases this project supports (>= 4.51; tested 4.51.3 and 5.24)
that the code must handle, each with the releases it is for: names of config fields, keyword arguments and
flags that a release renamed. The package and finetune.py call these instead of testing the version (none of them
reads transformers.__version__); code that avoids a changing transformers API altogether (the model's plain
output class, its own generation loop) says so where it does."""
import json
import warnings
from pathlib import Path


def config_dtype(config: dict):
    """The weights' dtype recorded in a config.json: `dtype` (written by transformers >= 5) or `torch_dtype`
    (transformers 4.x and the official THUDM files); None when neither."""
    return config.get("dtype") or config.get("torch_dtype")


def requested_dtype(dtype=None, torch_dtype=None):
    """The dtype a from_pretrained caller asked for: `dtype` (transformers >= 5) or `torch_dtype` (4.x, and
    users' habit)."""
    return dtype or torch_dtype


def rope_config(rope_theta: float, partial_rotary_factor: float) -> dict:
    """A GLM config.json's rotary settings for every release: `rope_parameters` (read by transformers >= 5) and
    the top-level `rope_theta` / `partial_rotary_factor` (read by 4.x)."""
    return {"rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                "partial_rotary_factor": partial_rotary_factor},
            "rope_theta": rope_theta, "partial_rotary_factor": partial_rotary_factor}


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
