"""Progress display that stays readable in a log file.

On a terminal, :func:`progress_bar` is a tqdm bar. Anywhere else (stderr redirected to a file, a pipe, a batch job)
a tqdm bar redraws itself with carriage returns, and a training run ends as one line of tens of kilobytes; there it
is a :class:`LogProgress` instead, which writes a plain line at every tenth of the work and at least every
``every_s`` seconds, e.g. ``train SAEs: 300/1000 (30%), 12 s, 25.0/s, b0: L0 12.3 MSE 0.0123``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class LogProgress:
    """A tqdm-like progress counter that writes whole lines (no carriage returns, no terminal codes).

    Supports the part of tqdm's interface the project uses: ``update(n)``, ``set_postfix(dict | **kw)``,
    ``close()``, and use as a context manager or an iterator wrapper.

    Args:
        total: number of units of work (steps); None if unknown.
        initial: units already done (a resumed run).
        desc: label at the start of each line.
        file: where the lines go (default: ``sys.stderr`` at the time of each write).
        n_lines: lines over the whole run (one every ``total / n_lines`` units), besides the final one.
        every_s: also write a line when this many seconds passed since the last one (a slow run stays visible).
        disable: write nothing.
    """

    def __init__(self, iterable: Any = None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 file: TextIO | None = None, n_lines: int = 10, every_s: float = 60.0, disable: bool = False,
                 clock=time.monotonic) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.desc = total, int(initial), desc
        self.file, self.disable, self.every_s, self.clock = file, disable, float(every_s), clock
        self.step = max(1, -(-total // n_lines)) if total else None  # units between two lines
        self.postfix = ""
        self.start = self.last = clock()
        self.start_n = self.n
        self.next_n = (self.n // self.step + 1) * self.step if self.step else None
        self.closed = False
        self._written_n: int | None = None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}: {v}" if isinstance(k, str) and " " in str(v) else f"{k}={v}"
                                 for k, v in items.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self.closed:
            return
        now = self.clock()
        if (self.next_n is not None and self.n >= self.next_n) or now - self.last >= self.every_s:
            self._write(now)
            if self.next_n is not None:
                self.next_n = (self.n // self.step + 1) * self.step

    def close(self) -> None:
        if not self.closed and not self.disable and self.n != self._written_n:
            self._write(self.clock())
        self.closed = True

    def _write(self, now: float) -> None:
        elapsed = now - self.start
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else float("nan")
        line = f"{self.desc}: {done}, {elapsed:.0f} s, {rate:.1f}/s" + (f", {self.postfix}" if self.postfix else "")
        stream = self.file or sys.stderr
        stream.write(line + "\n")
        stream.flush()
        self.last, self._written_n = now, self.n


def in_notebook() -> bool:
    """True inside a Jupyter kernel (ipykernel imported and an IPython kernel running)."""
    if "ipykernel" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def show_progress(enabled: bool | None, file: TextIO | None = None) -> bool:
    """Whether a long call shows progress: ``enabled`` when given; None (the library's default) means yes on a
    terminal or in a notebook, no elsewhere (a script whose stderr is a file, a test)."""
    if enabled is not None:
        return bool(enabled)
    stream = file or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) or in_notebook()


def progress_bar(iterable: Any = None, *, total: int | None = None, initial: int = 0, desc: str = "",
                 enabled: bool | None = True, file: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, else a :class:`LogProgress` (whole lines, about ten per run).

    Args:
        iterable: optional iterable to wrap (as ``tqdm(iterable)``).
        total, initial, desc: as tqdm's.
        enabled: False shows nothing; None shows progress on a terminal or in a notebook (:func:`show_progress`).
        file: the stream (default ``sys.stderr``); its ``isatty()`` decides between the two.
    """
    stream = file or sys.stderr
    enabled = show_progress(enabled, file)
    is_tty = bool(getattr(stream, "isatty", lambda: False)())
    if enabled and is_tty:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, file=stream, dynamic_ncols=True)
    return LogProgress(iterable, total=total, initial=initial, desc=desc, file=file, disable=not enabled)
