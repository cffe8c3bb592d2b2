"""sha256 of files, in parallel across files.

hashlib releases the GIL while it digests large buffers, so threads give real
parallelism across files; one file is inherently sequential.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 8 << 20


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            if on_bytes:
                on_bytes(n)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path], *, workers: int | None = None, on_bytes: Callable[[int], None] | None = None) -> dict[Path, str]:
    """Hash many files at once; the largest start first so the last one finishes early."""
    ordered = sorted(paths, key=lambda p: p.stat().st_size, reverse=True)
    if not ordered:
        return {}
    workers = workers or min(len(ordered), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        return dict(zip(ordered, pool.map(lambda p: sha256_file(p, on_bytes), ordered), strict=True))
