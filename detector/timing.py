"""An optional hook that records where detect() spends its time (bench/detect_stages.py).

    timer = StageTimer()
    model.detect(image, timer=timer)
    timer.times   # {"proposals": s, "resize": s, "conv": s, "spp": s, "fc": s, "svm": s, ...}
    timer.counts  # {"proposals": N, "windows": U}

One running clock: each `lap(name)` adds the time since the previous lap to `name`.  Code
that is given no timer uses `NO_TIMER`, whose methods do nothing.
"""
from __future__ import annotations

import time


class StageTimer:
    def __init__(self):
        self.times: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._last
        self._last = now

    def count(self, name: str, n: int) -> None:
        self.counts[name] = int(n)

    @property
    def total(self) -> float:
        return sum(self.times.values())


class _NoTimer(StageTimer):
    def start(self) -> None:
        pass

    def lap(self, name: str) -> None:
        pass

    def count(self, name: str, n: int) -> None:
        pass


NO_TIMER = _NoTimer()
