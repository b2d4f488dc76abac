"""Running meters and the periodic progress line (median/global average, ETA, timings)."""

from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque

import torch


class Meter:
    """Window median plus global (count-weighted) average of a scalar series."""

    def __init__(self, window: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.values = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.values)).median()) if self.values else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.values[-1] if self.values else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class ProgressLogger:
    """Collects meters and prints a progress line every ``print_freq`` iterations."""

    def __init__(self, header: str, total: int, print_freq: int = 10):
        self.header, self.total, self.print_freq = header, total, print_freq
        self.meters: dict[str, Meter] = defaultdict(Meter)
        self.iter_time = Meter(fmt="{median:.4f}")
        self.data_time = Meter(fmt="{median:.4f}")
        self.start = time.time()
        self._last = self.start

    def update(self, n: int = 1, **values) -> None:
        for k, v in values.items():
            if v is None:
                continue
            self.meters[k].update(float(v), n)

    def mark_data(self) -> None:
        """Call when a batch has arrived: the time since the last step is data-loading time."""
        self.data_time.update(time.time() - self._last)

    def step(self, i: int, extra: str = "") -> None:
        now = time.time()
        self.iter_time.update(now - self._last)
        self._last = now
        if i % self.print_freq == 0 or i == self.total - 1:
            eta = datetime.timedelta(seconds=int(self.iter_time.global_avg * (self.total - i - 1)))
            parts = [f"{self.header} [{i:>{len(str(self.total))}}/{self.total}]", f"eta: {eta}"]
            parts += [f"{k}: {m}" for k, m in self.meters.items()]
            parts += [f"time: {self.iter_time}", f"data: {self.data_time}"]
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
            if extra:
                parts.append(extra)
            print("  ".join(parts), flush=True)

    def elapsed(self) -> float:
        return time.time() - self.start

    def summary(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}
