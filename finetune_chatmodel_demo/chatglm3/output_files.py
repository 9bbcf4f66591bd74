"""Writing a script's output files without ever clobbering its inputs or a half-written file.

`check_outputs` runs before any work: an output may not be one of the inputs or another output (same resolved
path, or same file through a link: inode and device), and must be a regular file or a new path whose nearest
existing parent is a directory. `refuse_device_inputs` refuses a device as an input (/dev/zero would be read forever); a
pipe is fine (`--path <(zcat data.json.gz)`). `write_atomic` writes through a temporary file in the same
directory and renames it over the target, so a failure (a full disk) leaves the old file as it was;
`write_all_atomic` does so for a script's several outputs at once, renaming only when every one was written.
`reported_write_errors` turns a write that fails into one line naming what was being written, why, and the space
left.
"""
import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Mapping

from safetensors import SafetensorError

from chatglm3.errors import ChatGLMError


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _check_writable_path(label: str, path: Path) -> None:
    """A regular file, or a new path under a folder (existing or to be made)."""
    if path.exists():
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ChatGLMError(f"错误：{label} {path} 是目录，请给出文件路径 / Error: {label} {path} is a directory; "
                               "give a file path")
        if not stat.S_ISREG(mode):
            raise ChatGLMError(f"错误：{label} {path} 不是普通文件（设备、管道或套接字）/ Error: {label} {path} is not "
                               "a regular file (a device, pipe or socket); give a file path")
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ChatGLMError(f"错误：{label} {path} 无法创建：{parent} 不是目录 / Error: cannot create {label} {path}: "
                           f"{parent} is not a directory")


def _paths(named) -> list:
    """(label, Path) pairs from a mapping or from pairs (a label may repeat: the files of one folder flag)."""
    pairs = named.items() if isinstance(named, Mapping) else (named or ())
    return [(label, Path(path)) for label, path in pairs if path is not None]


def refuse_device_inputs(inputs) -> None:
    """Refuse an input that is a device. `inputs`: {flag: path} or (flag, path) pairs; None paths are skipped."""
    for label, path in _paths(inputs):
        if path.exists() and (path.is_char_device() or path.is_block_device()):
            raise ChatGLMError(f"错误：输入 {label} {path} 是设备，不是文件 / Error: input {label} {path} is a device, "
                               "not a file")


def check_outputs(inputs=None, outputs=None) -> None:
    """Refuse (ChatGLMError, one line naming both flags) an output that is an input or another output, or that
    cannot be a file, and a device as input. `inputs`, `outputs`: {flag: path} or (flag, path) pairs, the flag
    being what the user typed; None paths are skipped."""
    refuse_device_inputs(inputs)
    inputs, outputs = _paths(inputs), _paths(outputs)
    seen = []
    for label, path in outputs:
        _check_writable_path(label, path)
        for input_label, input_path in inputs:
            if _same(path, input_path):
                raise ChatGLMError(f"错误：输出 {label} {path} 与输入 {input_label} {input_path} 是同一个文件，会被覆盖 / "
                                   f"Error: output {label} {path} is an input file ({input_label} {input_path}); "
                                   "choose another output path")
        for other_label, other in seen:
            if _same(path, other):
                raise ChatGLMError(f"错误：输出 {label} 与 {other_label} 是同一个文件 {path} / Error: outputs "
                                   f"{label} and {other_label} are the same file ({path}); give each its own path")
        seen.append((label, path))


def check_output_dir(label: str, path, inputs) -> None:
    """An output directory must be a directory or a new path, and not the directory of an input (saving a model
    into its base model's directory would replace the base weights). `inputs`: {flag: directory}."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ChatGLMError(f"错误：{label} {path} 已存在且不是目录 / Error: {label} {path} exists and is not a directory")
    for input_label, folder in _paths(inputs):
        if path.is_dir() and folder.is_dir() and os.path.samefile(path, folder):
            raise ChatGLMError(f"错误：{label} {path} 就是 {input_label} 的目录，保存时会覆盖其中的文件 / Error: {label} {path} is "
                               f"the directory of {input_label}; saving would replace its files: choose another {label}")


def new_file_mode() -> int:
    """The permissions `open()` gives a new file under the current umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def share_weight_files(folder) -> None:
    """safetensors writes its files readable by their owner only (0o600); give the weight files in `folder` the
    usual permissions, so that a server or another account can read what training saved."""
    for path in Path(folder).glob("*.safetensors"):
        if stat.S_IMODE(path.stat().st_mode) == 0o600:
            os.chmod(path, new_file_mode())


def _write_temporary(path, data) -> tuple:
    """(temporary file, target): `data` written and synced beside the target, with the target's permissions."""
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise ChatGLMError(f"错误：输出路径 {path} 是目录 / Error: output path {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, path


def write_all_atomic(files) -> None:
    """Write several outputs all or nothing: `files` is {path: data} (data as for write_atomic). Every file is
    first written to a temporary file beside its target; only when all were written are they renamed over their
    targets, so a failure on the second output (a full disk, a bad value) leaves the first one as it was."""
    written = []
    try:
        for path, data in files.items():
            written.append(_write_temporary(path, data))
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_atomic(path, data) -> None:
    """Write `data` (str, as UTF-8 with \\n line ends, or bytes) to `path` (through a link, to the file it names)
    via a temporary file in the same folder and a rename: a failure leaves no half file and the old one intact.
    The new file gets the old file's permissions, or the usual ones for a new file."""
    write_all_atomic({path: data})


def _free_gib(path: Path) -> float:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**30


@contextlib.contextmanager
def reported_write_errors(target, hint=("", "")):
    """A write into `target` (a file or folder) that fails inside the block, for lack of space or otherwise,
    becomes one ChatGLMError line: the target, the reason, the space left, then `hint` (Chinese, English)."""
    try:
        yield
    except ChatGLMError:
        raise
    except (OSError, RuntimeError, SafetensorError) as e:  # Python's own files, torch.save, safetensors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
        free = _free_gib(Path(target).absolute())
        raise ChatGLMError(f"错误：写入 {target} 失败：{reason}（所在磁盘剩余 {free:.1f} GiB）{hint[0]} / Error: writing "
                           f"{target} failed: {reason} ({free:.1f} GiB free on its disk){hint[1]}") from None


def markers(name: str) -> tuple:
    """The pair of comments that marks a measured block in a docs file (Markdown hides them)."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_marked_block(path, name: str, text: str) -> None:
    """Replace what stands between the `name` markers of the docs file `path` with `text` (the markers stay), so that
    a script that measures a table writes it where the docs show it. A file without exactly one pair is one line
    that says what to do, and nothing is written."""
    start_marker, end_marker = markers(name)
    try:
        content = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ChatGLMError(f"错误：读不了 {path}（{e.strerror or e}）/ Error: cannot read {path}: {e.strerror or e}") from None
    start, end = content.find(start_marker), content.find(end_marker)
    if start < 0 or end < start or content.count(start_marker) != 1 or content.count(end_marker) != 1:
        raise ChatGLMError(f"错误：{path} 中没有唯一一对 {start_marker} … {end_marker} 标记；请把它们加回要更新的表两侧 / "
                           f"Error: {path} needs exactly one {start_marker} … {end_marker} pair around the table to update")
    write_atomic(path, content[:start + len(start_marker)] + "\n" + text.rstrip("\n") + "\n" + content[end:])
