"""Progress of a long stage (training steps, evaluation batches, export tensors): steps done of the total, time
spent and time left.

On a terminal: tqdm's bar, redrawn in place, shown once a stage has run for two seconds. Otherwise (a log file, a pipe): one plain line every
CHATGLM3_PROGRESS_SECONDS seconds (environment variable, default 30; 0 = a line per update) and a last one at
the end, so a log shows how far a run got without thousands of redraws; a stage shorter than the interval
writes nothing.
"""
import os
import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

from chatglm3.limits import NON_NEGATIVE

SECONDS_ENV = "CHATGLM3_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), 已用 / elapsed {elapsed}, 剩余 / left {remaining}"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt}, 已用 / elapsed {elapsed}"


def line_interval() -> float:
    """Seconds between two plain lines: $CHATGLM3_PROGRESS_SECONDS (checked), else 30."""
    value = os.environ.get(SECONDS_ENV, "").strip()
    return NON_NEGATIVE.check(SECONDS_ENV, value) if value else DEFAULT_SECONDS


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class Progress:
    """`update(n)` as steps finish, `close()` at the end (or use it as a context manager); `write(line)` prints a
    line without breaking the bar. `desc` names what is counted ("训练步 / training steps"), `unit` is the bar's
    rate unit. `initial`: steps done before this run (a resumed training), left out of the rate. `disable`:
    nothing at all (a caller that wants no progress)."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "step", initial: int = 0,
                 file: Optional[TextIO] = None, disable: bool = False):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.file = file if file is not None else sys.stderr
        self.disable = disable
        self.n = initial
        self.bar = None
        if not disable and _is_terminal(self.file):
            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.file, dynamic_ncols=True,
                            mininterval=0.5, delay=2)
        self.every = line_interval() if not disable and self.bar is None else 0.0
        self.start = self.last_line = time.monotonic()
        self.lines = 0  # plain lines written
        self.n_at_last_line = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.disable and time.monotonic() - self.last_line >= self.every:
            self._line()

    def write(self, text: str, file: Optional[TextIO] = None) -> None:
        """`text` on `file` (stdout by default, as tqdm.write) without breaking the bar."""
        file = file if file is not None else sys.stdout
        if self.bar is not None:
            tqdm.write(text, file=file)
        else:
            print(text, file=file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.disable and self.lines and self.n != self.n_at_last_line:
            self._line()  # the log ends on where the stage ended
        self.disable = True

    def line(self) -> str:
        """The plain line for now."""
        fmt = LINE_FORMAT if self.total else LINE_FORMAT_NO_TOTAL
        return tqdm.format_meter(self.n, self.total, time.monotonic() - self.start, prefix=self.desc, unit=self.unit,
                                 initial=self.initial, bar_format=fmt)

    def _line(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.last_line = time.monotonic()
        self.lines += 1
        self.n_at_last_line = self.n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
