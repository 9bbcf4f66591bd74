"""The two training formats (as upstream's finetune.py names them) and how a trained model is asked:

- "multi-turn": the ChatGLM3 chat format (chatglm3.conversation);
- "input-output": the raw prompt as training saw it, `[gMASK] sop` + prompt with no role tokens (upstream's
  inference.py sent prompts this way); each prompt stands alone, with no history.

finetune.py records the format in every checkpoint's config.json (`train_format`); inference.py and evaluate.py
read it back (a flag overrides). Models without the record (the base model, older checkpoints) are chat models.
"""
import json
from pathlib import Path
from typing import Optional

FORMATS = ("multi-turn", "input-output")
CONFIG_KEY = "train_format"


def recorded(model, pt_checkpoint: Optional[str] = None) -> Optional[str]:
    """The format a P-Tuning checkpoint (its config.json) or else the model's config records, if any."""
    if pt_checkpoint is not None:
        try:
            value = json.loads((Path(pt_checkpoint) / "config.json").read_text(encoding="utf-8")).get(CONFIG_KEY)
        except (OSError, ValueError, AttributeError):
            value = None
        if value in FORMATS:
            return value
    value = getattr(model.config, CONFIG_KEY, None)
    return value if value in FORMATS else None


def choose(flag: Optional[str], model, pt_checkpoint: Optional[str] = None) -> str:
    """--format when given, else the recorded format, else multi-turn."""
    return flag or recorded(model, pt_checkpoint) or "multi-turn"


def raw_prompt_ids(tokenizer, prompt: str) -> list:
    """An input-output model's prompt: encoded as training encoded it (preprocess_utils.InputOutputDataset)."""
    return tokenizer.encode(prompt, add_special_tokens=True)
