"""Putting what a benchmark measured into the docs, so that re-measuring is a command, not a hand edit.

A docs file marks each measured block with `<!-- NAME:start -->` and `<!-- NAME:end -->`; `update_docs` replaces
the text between them. The scripts call it with `--update-docs` (bench_memory.py also takes its old name
`--update-readme`). This module imports nothing heavy: bench_memory.py's parent process must stay without torch.
"""
import io
import shlex
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PERFORMANCE = REPO / "docs" / "performance.md"


class DocsError(Exception):
    """A docs file without the expected markers; the message is one line that says what to do."""


def markers(name: str) -> tuple:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"  # as chatglm3.output_files.markers (no torch here)


def update_docs(path: Path, name: str, text: str):
    """Replace what stands between the `name` markers of `path` with `text` (chatglm3.output_files, imported only
    now: a measuring parent process stays without torch until its table is written)."""
    from chatglm3 import ChatGLMError
    from chatglm3.output_files import replace_marked_block

    try:
        replace_marked_block(path, name, text)
    except ChatGLMError as e:
        raise DocsError(str(e)) from None


def add_flag(parser, name: str):
    """--update-docs: the printed table into docs/performance.md, between the `name` markers."""
    parser.add_argument("--update-docs", action="store_true",
                        help=f"把结果写进 docs/performance.md 的 {name} 标记之间 / put the result into docs/performance.md "
                             f"between the {name} markers")


def command_line(script: str, argv=None, runner: str = "python") -> str:
    """The command that reproduces a run, relative to the repository."""
    return shlex.join([runner, f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.buffer_ = stream, io.StringIO()

    def write(self, text):
        self.buffer_.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


class Recorder:
    """With --update-docs, keeps a copy of what the script prints to stdout; `publish` puts it, headed by the
    command, between the `name` markers of docs/performance.md: fenced as a code block, or as it is when it is
    Markdown (then the script's `# ` header lines become list items). A --json last line is left out."""

    def __init__(self, name: str, args, script: str, argv=None, markdown: bool = False, path: Optional[Path] = None,
                 runner: str = "python"):
        self.name, self.path, self.markdown = name, path or PERFORMANCE, markdown
        self.enabled, self.json = getattr(args, "update_docs", False), getattr(args, "json", False)
        self.command = command_line(script, argv, runner)
        self.tee = None
        if self.enabled:
            self.tee = _Tee(sys.stdout)
            sys.stdout = self.tee

    def publish(self):
        if not self.enabled:
            return
        sys.stdout = self.tee.stream
        lines = self.tee.buffer_.getvalue().rstrip("\n").splitlines()
        if self.json and lines:
            lines = lines[:-1]
        body = "\n".join(lines).strip("\n")
        if self.markdown:
            body = "\n".join("- " + line[2:] if line.startswith("# ") else line for line in body.splitlines())
            text = f"`{self.command}`\n\n{body}\n"
        else:
            text = f"```\n$ {self.command}\n{body}\n```\n"
        update_docs(self.path, self.name, text)
        print(f"已写入 / written: {self.path} ({self.name})", file=sys.stderr, flush=True)
