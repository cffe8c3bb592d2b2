"""Byte progress for long work: a bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time

from tqdm import tqdm

from ops.settings import progress_seconds
from ops.units import format_bytes, format_rate

log = logging.getLogger("bakehouse.progress")


class Progress:
    """Thread-safe byte counter shared by every download or hash worker."""

    def __init__(self, label: str, total: int, *, tty: bool | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self._lock = threading.Lock()
        self._start = self._last_log = time.monotonic()
        self._every = progress_seconds()
        use_bar = sys.stderr.isatty() if tty is None else tty
        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=label, leave=False) if use_bar else None

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif time.monotonic() - self._last_log >= self._every:
                self._last_log = time.monotonic()
                log.info("%s", self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
        pct = 100 * self.done / self.total if self.total else 100
        return f"{self.label}: {format_bytes(self.done)} / {format_bytes(self.total)} ({pct:.0f}%), {format_rate(self.done, elapsed)}, ETA {eta}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
