"""The two training formats (as upstream's finetune.py names them) and how a trained model is asked:

- "multi-turn": the ChatGLM3 chat format (chatglm3.model.conversation);
- "input-output": the raw prompt as training saw it, `[gMASK] sop` + prompt with no role tokens (upstream's
  inference.py sent prompts this way); each prompt stands alone, with no history.

finetune.py records the format (`train_format`) in every checkpoint's config.json and tokenizer_config.json (a
LoRA adapter folder has only the latter: PEFT writes no config.json); inference.py and evaluate.py read it back (a
flag overrides). Models without the record (the base model, older checkpoints) are chat models.
"""
from pathlib import Path
from typing import Optional

from chatglm3 import json_files

FORMATS = ("multi-turn", "input-output")
CONFIG_KEY = "train_format"


def record(model, tokenizer, fmt: str) -> None:
    """Make every checkpoint saved from now on record `fmt` (see the module doc)."""
    setattr(model.config, CONFIG_KEY, fmt)
    tokenizer.init_kwargs[CONFIG_KEY] = fmt


def recorded(model_path, pt_checkpoint: Optional[str] = None, adapter: Optional[str] = None) -> Optional[str]:
    """The format the P-Tuning checkpoint records, else the LoRA adapter's, else the model folder's; None when none
    does (a Hub id names a base model, which records none)."""
    places = [(pt_checkpoint, "config.json"), (adapter, "tokenizer_config.json"), (model_path, "config.json")]
    for folder, name in places:
        config = Path(folder) / name if folder is not None else None
        if config is None or not config.is_file():
            continue
        try:  # a broken file is reported by the loader that needs it (chatglm3.json_files' one line)
            value = json_files.read_json(config).get(CONFIG_KEY)
        except json_files.JSONFileError:
            continue
        if value in FORMATS:
            return value
    return None


def choose(flag: Optional[str], model_path, pt_checkpoint: Optional[str] = None, adapter: Optional[str] = None) -> str:
    """--format when given, else the recorded format, else multi-turn."""
    return flag or recorded(model_path, pt_checkpoint, adapter) or "multi-turn"


def raw_prompt_ids(tokenizer, prompt: str) -> list:
    """An input-output model's prompt: encoded as training encoded it (preprocess_utils.InputOutputDataset)."""
    return tokenizer.encode(prompt, add_special_tokens=True)
