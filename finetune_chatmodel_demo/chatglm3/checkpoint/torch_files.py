"""Reading torch pickle files (DeepSpeed, Trainer and P-Tuning checkpoints) without running code from them.

A torch file is a pickle, and a pickle can call any function while it is read. Every torch file the project
reads goes through `torch_load`: torch's restricted unpickler (`weights_only=True`) with an allow-list of the
few classes DeepSpeed's and the Trainer's own checkpoints hold (`ALLOWED_GLOBALS`, read off deepspeed 0.19.8
ZeRO-2/ZeRO-3 checkpoints in float32 and bf16 written by transformers 5.24; DynamicLossScaler is fp16's). The
checkpoint is read once, as before; nothing in it depends on the machine that wrote it.

DeepSpeed's `engine.load_checkpoint` calls `torch.load(weights_only=False)` itself (deepspeed/runtime/
checkpoint_engine/torch_checkpoint_engine.py; the other checkpoint engines and ZeRO-3 helpers call torch.load
too), so training runs inside `only_safe_torch_load()`, which routes every `torch.load` through `torch_load`.
`verify_checkpoint` checks a checkpoint folder before a resume starts: every file it holds is whole (an empty
file, a torch file whose zip directory is missing or points past the end, a safetensors file shorter than its
header says, JSON that does not parse: found without reading the tensors), and every file training will read holds
no object outside the allow-list.
"""
import contextlib
import importlib
import os
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from chatglm3 import json_files
from chatglm3.errors import ChatGLMError

# Classes (module.name, as pickle spells them) the checkpoints of DeepSpeed and the Trainer hold, beyond the
# tensors, containers and numbers torch's restricted unpickler always allows.
ALLOWED_GLOBALS = (
    # DeepSpeed's optimizer states (zero_pp_rank_*_optim_states.pt, bf16_zero_pp_rank_*).
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    # numpy's random state in the Trainer's rng_state*.pth (numpy >= 2 / numpy 1.x spelling).
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",  # the dtype of the Mersenne Twister state (numpy >= 1.25 pickles it by class)
)
# The Trainer writes trainer_state.json last: a checkpoint without it was cut short (e.g. the run was killed).
TRAINER_STATE_NAME = "trainer_state.json"
# The files a resume reads, by name (training_args.bin is written for the user and never read back).
RESUME_FILES = ("global_step*/*.pt", "rng_state*.pth", "optimizer.pt", "scheduler.pt", "scaler.pt",
                "*.safetensors", "pytorch_model*.bin", "adapter_model*.bin", "*.json")
_UNSAFE = "Weights only load failed"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_OTHER_RE = re.compile(r"WeightsUnpickler error:\s*(.+)")  # a disallowed instruction rather than a global
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6; older files are plain pickles
_PICKLE_PROTO = b"\x80"  # the first opcode of every pickle of protocol 2 and later (old-style torch files)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_MAY_BE_EMPTY = (".py", ".md", ".txt")  # code and notes carried from the base model's folder
_torch_load = torch.load  # the real one, kept before only_safe_torch_load replaces it


class UnsafeFileError(ChatGLMError):
    """A file holds an object that could run code when read; never loaded."""


class CorruptFileError(ChatGLMError):
    """A file cannot be read: truncated, damaged or not what its name says."""


def _unsafe(path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"错误：{path} 含有不允许的内容 {what}（读取时可能执行代码），已拒绝加载；请删除该文件所在的检查点，或从可信的副本恢复 / "
        f"Error: {path} holds something that is not allowed ({what}) and could run code when read; it was not "
        "loaded. Delete the checkpoint it belongs to, or restore it from a trusted copy"
    )


def _corrupt(path, error) -> CorruptFileError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CorruptFileError(f"错误：无法读取 {path}（文件损坏或不完整）/ Error: cannot read {path} (damaged or "
                            f"incomplete file): {reason}")


def allowed_globals() -> list:
    """The allow-listed classes whose module is loaded: a DeepSpeed checkpoint is only read by DeepSpeed, so its
    classes are looked up only once DeepSpeed runs (importing it just to read a P-Tuning prefix would be slow)."""
    found = []
    for name in ALLOWED_GLOBALS:
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] not in sys.modules:
            continue
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # the other numpy spelling, or a DeepSpeed without fp16 scalers
            continue
    return found


def torch_load(file, map_location="cpu", mmap: bool = False):
    """torch.load with the restricted unpickler and ALLOWED_GLOBALS. Raises UnsafeFileError (naming the file and
    the object) or CorruptFileError, both one line."""
    name = file if isinstance(file, (str, os.PathLike)) else getattr(file, "name", "<stream>")
    path = Path(file) if isinstance(file, (str, os.PathLike)) else None
    if mmap and path is not None and path.is_file() and not _starts_with(path, _ZIP_MAGIC):
        mmap = False  # torch maps only its zip format; an old-style pickle is read (and checked) the plain way
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _torch_load(file, map_location=map_location, weights_only=True, mmap=mmap or None)
    except pickle.UnpicklingError as e:
        if _UNSAFE in str(e):
            found = _GLOBAL_RE.search(str(e)) or _OTHER_RE.search(str(e))
            raise _unsafe(name, found.group(1).strip() if found else "?") from None
        raise _corrupt(name, e) from None
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise _corrupt(name, e) from None


def _safe_torch_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """Stands in for torch.load: whatever the caller asks (DeepSpeed asks weights_only=False), it gets torch_load."""
    return torch_load(f, map_location=map_location, mmap=bool(mmap))


@contextlib.contextmanager
def only_safe_torch_load():
    """Within the block every torch.load (DeepSpeed's and the Trainer's included) is `torch_load`."""
    saved = torch.load
    torch.load = _safe_torch_load
    try:
        yield
    finally:
        torch.load = saved


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(magic)) == magic


def _check_torch_file(path: Path, check_globals: bool) -> None:
    """A torch file is whole: torch's zip format with a central directory whose members lie within the file (a
    truncated file loses the directory, kept at the end), or an old-style pickle; its globals against the
    allow-list when `check_globals`."""
    size = path.stat().st_size
    if _starts_with(path, _ZIP_MAGIC):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.header_offset + member.compress_size > size:
                    raise _corrupt(path, f"{member.filename} extends past the end of the file")
        if check_globals:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - set(ALLOWED_GLOBALS))
            if unsafe:
                raise _unsafe(path, ", ".join(unsafe))
    elif not _starts_with(path, _PICKLE_PROTO):  # an old-style file is checked by torch_load when it is read
        raise _corrupt(path, "empty file" if size == 0 else "neither torch's zip format nor a pickle")


def check_file(path: Path, read_on_resume: bool = True) -> None:
    """Whole (and, when a resume reads it, safe), read without the tensors: a torch file's zip directory and
    pickle globals, a safetensors header against the file size, a JSON file parsed (chatglm3.json_files); any
    other file at least not empty."""
    try:
        if path.name == TRAINER_STATE_NAME:
            json_files.read_trainer_state(path)  # its shape too: the Trainer reads log_history and global_step
        elif path.suffix == ".json":
            json_files.read_json(path)
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        elif path.suffix in _TORCH_SUFFIXES:
            _check_torch_file(path, check_globals=read_on_resume)
        elif path.stat().st_size == 0 and path.suffix not in _MAY_BE_EMPTY:
            raise _corrupt(path, "empty file")
    except json_files.JSONFileError as e:
        raise CorruptFileError(str(e)) from None
    except ChatGLMError:
        raise
    except Exception as e:  # safetensors, zipfile and torch each have their own errors for a bad file
        raise _corrupt(path, e) from None


def verify_checkpoint(folder) -> None:
    """Every file in `folder` is whole; those a resume reads (RESUME_FILES, and DeepSpeed's `latest` tag) are
    safe too. Raises UnsafeFileError or CorruptFileError."""
    folder = Path(folder)
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not (folder / tag).is_dir():
            raise CorruptFileError(f"错误：{latest} 指向不存在的 {tag} / Error: {latest} names {tag!r}, which is "
                                   "not a folder of this checkpoint")
    read = {f for pattern in RESUME_FILES for f in folder.glob(pattern) if f.is_file()}
    for file in sorted(f for f in folder.rglob("*") if f.is_file()):
        check_file(file, read_on_resume=file in read)
