"""What a full fine-tuning checkpoint carries over from its base model folder, so that upstream's tools open it
the way they open THUDM/chatglm3-6b (composite_demo with MODEL_PATH=checkpoint, `AutoModel.from_pretrained(...,
trust_remote_code=True)`, serving engines that read the official layout): the model code files (`*.py`, copied
as plain files: this project never imports or runs them), `auto_map` in config.json and tokenizer_config.json,
and generation_config.json. The weights, config and tokenizer files themselves are written by the trainer."""
import shutil
from pathlib import Path

from chatglm3 import json_files

CARRIED_FILES = ("*.py", "generation_config.json")
AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")


def _read_json(path: Path) -> dict:
    """The object in `path`, {} when it is missing or not one (nothing is carried then)."""
    try:
        return json_files.read_json(path) if path.is_file() else {}
    except json_files.JSONFileError:
        return {}


def copy_upstream_files(base_dir, checkpoint_dir) -> list:
    """Copy what upstream's tools need from `base_dir` into `checkpoint_dir`; the names copied."""
    base, out = Path(base_dir), Path(checkpoint_dir)
    carried = []
    for pattern in CARRIED_FILES:
        for source in sorted(base.glob(pattern)):
            if source.is_file():
                shutil.copyfile(source, out / source.name)
                carried.append(source.name)
    for name in AUTO_MAP_FILES:
        auto_map = _read_json(base / name).get("auto_map")
        target = out / name
        if auto_map and target.is_file():
            data = _read_json(target)
            data["auto_map"] = auto_map
            target.write_text(json_files.dumps(data, str(target), indent=2) + "\n", encoding="utf-8")
            carried.append(f"{name}:auto_map")
    return carried
