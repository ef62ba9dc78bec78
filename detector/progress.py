"""Progress reports for long work: a tqdm bar on a terminal, a few plain lines in a log.

tqdm redraws its bar with carriage returns; written to a file, that is hundreds of frames
on one "line".  So `progress_bar` gives tqdm only when standard error is a terminal, and
otherwise an object with the same interface (iteration, `update`, `set_postfix`, `close`)
that prints one line at every 10% of the total (and one at the end), e.g.

    selective search: 30% (88/292 img), 1m02s

`SPP_PROGRESS=bar|lines|none` overrides the choice (e.g. `lines` in a terminal).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional


def _mode() -> str:
    forced = os.environ.get("SPP_PROGRESS", "").strip().lower()
    if forced in ("bar", "lines", "none"):
        return forced
    try:
        return "bar" if sys.stderr.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or replaced stream
        return "lines"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class LineProgress:
    """tqdm's interface, reporting one line per `step` (a fraction) of the total."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[float] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, step: float = 0.1, **_):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable) + initial
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n = initial
        self.step = step
        self.postfix = ""
        self._t0 = time.monotonic()
        self._reported = int(initial / total / step + 1e-9) if total else 0  # the last step reported
        self._closed = False

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate over")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self) -> None:
        if self.disable:
            return
        done = f"{self.n}/{self.total:g}" if self.total else f"{self.n}"
        pct = f"{100 * self.n / self.total:.0f}% " if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        sys.stderr.write(f"{self.desc}: {pct}({done} {self.unit}), {_clock(time.monotonic() - self._t0)}{extra}\n")
        sys.stderr.flush()

    def update(self, n: float = 1) -> None:
        self.n += n
        if not self.total:
            return
        k = int(min(self.n / self.total, 1.0) / self.step + 1e-9)
        if k > self._reported and k > 0:
            self._reported = k
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def write(self, message: str) -> None:
        sys.stderr.write(message.rstrip("\n") + "\n")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.total or self.n < self.total:  # the end, when no 100% line was printed
            if self.n or not self.total:
                self._line()


def progress_bar(iterable: Optional[Iterable] = None, **kwargs):
    """A tqdm bar on a terminal; `LineProgress` (a line every 10%) when output goes to a file.
    Takes tqdm's arguments (desc, total, unit, initial, disable, ...)."""
    mode = _mode()
    if mode == "none":
        kwargs["disable"] = True
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
