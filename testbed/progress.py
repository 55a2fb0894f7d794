"""Progress of long commands (`data prepare`, `fit`): a tqdm bar when stderr is a terminal, one
plain line per interval when it is not (a SLURM log, a file, a pipe), nothing when off.

Off unless a command switches it on (`enabled(True)`), so library calls and tests stay quiet;
the commands' `--quiet` leaves it off. In a log a task shorter than the interval writes nothing;
a longer one writes a line each interval and a last line when it ends. TESTBED_PROGRESS_INTERVAL
sets the interval in seconds (default 30; 0: a line at every update).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

INTERVAL_ENV = "TESTBED_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
_on = False


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Progress on (or off) inside the block; the previous setting after it."""
    global _on
    before, _on = _on, on
    try:
        yield
    finally:
        _on = before


def is_on() -> bool:
    return _on


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def interactive() -> bool:
    """Whether stderr is a terminal (bars), not a log (lines)."""
    return _is_tty(sys.stderr)


def say(message: str) -> None:
    """A line on stderr that does not break a progress bar drawn there."""
    if _is_tty(sys.stderr):
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """One task's progress; `update`, `set_total`, `set_postfix`, `close` (or use `with`)."""

    def __init__(self, desc: str, total: float | None = None, unit: str = "it", unit_scale: bool = False,
                 leave: bool = True):
        self.desc, self.total, self.unit, self.unit_scale = desc, total, unit, unit_scale
        self.n: float = 0
        self.postfix = ""
        self.bar: Any = None
        self.lines = 0
        self.on = _on
        if not self.on:
            return
        self.stream = sys.stderr
        self.started = self.last = time.monotonic()
        self.interval = _interval()
        if _is_tty(self.stream):
            from tqdm import tqdm

            # delay: a task over in under a second never draws a bar.
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave,
                            file=self.stream, delay=1.0, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        if not self.on:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_total(self, total: float | None) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if not self.on:
            return
        self.on = False
        if self.bar is not None:
            self.bar.close()
        elif self.lines:  # a task that wrote lines says that it ended
            self._line(done=True)

    def _count(self, value: float) -> str:
        from tqdm import tqdm

        return tqdm.format_sizeof(value) if self.unit_scale else f"{value:,.0f}"

    def _line(self, done: bool = False) -> None:
        from tqdm import tqdm

        elapsed = time.monotonic() - self.started
        unit = self.unit if self.unit_scale else f" {self.unit}s"  # 1.5MB, 400 docs
        count = self._count(self.n)
        if self.total:
            count += f"/{self._count(self.total)}{unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count += unit
        text = f"{self.desc}: {count}, {tqdm.format_interval(elapsed)}"
        if done:
            text += " (done)"
        elif self.total and self.n:
            text += f", ~{tqdm.format_interval(elapsed * (self.total - self.n) / self.n)} left"
        if self.postfix:
            text += f"; {self.postfix}"
        self.lines += 1
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):  # the log has gone: no more progress
            self.on = False
