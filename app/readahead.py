"""The verified weights into the page cache while the server starts: read ahead, in the background.

After its quick verify the entrypoint imports torch and the engine (4-5 s on a
2-core machine) before the loader maps the weights. On a cold page cache (a new
node, a new container, or a fetch that wrote with O_DIRECT) the load would then
fault the files in as it touches them; reading them here, file after file with
large reads, during the imports, overlaps the two. The reads go to /dev/null
with sendfile: the kernel fills the page cache without copying the bytes to
this process (0.05 s of CPU for 1.5 GB). Nothing here is trusted: the loader
still verifies under its read hold and maps the files itself; this only warms
the cache, and stops quietly at the first file it cannot read.

Only a model that fits in half the memory available is read ahead (reading
more would evict what was read first before the load gets to it);
BAKEHOUSE_READAHEAD=0 turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ops.settings import env_flag

log = logging.getLogger("bakehouse.readahead")
STEP = 64 << 20


def memory_available(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable in bytes (0 where it cannot be read: then nothing is read ahead)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def start_readahead(directory: Path, files: Sequence[tuple[str, int]]) -> threading.Thread | None:
    """Read `files` (path in the model, size) of the verified copy at `directory` into the page cache in a daemon thread;
    None when off, or when the model would not fit in half the memory available."""
    total = sum(size for _, size in files)
    if not env_flag("BAKEHOUSE_READAHEAD", True) or not files:
        return None
    if total > memory_available() // 2:
        log.info("readahead: %.1f GB of weights is more than half the memory available; the load reads them itself", total / 1e9)
        return None
    thread = threading.Thread(target=_read, args=(directory, [p for p, _ in files], total), name="readahead", daemon=True)
    thread.start()
    return thread


def _read(directory: Path, paths: list[str], total: int) -> None:
    start = time.monotonic()
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for path in paths:
            if not _read_file(directory / path, null):
                return
    finally:
        os.close(null)
    log.info("readahead: %.2f GB in the page cache in %.2fs", total / 1e9, time.monotonic() - start)


def _read_file(path: Path, null: int) -> bool:
    """One file through the page cache into /dev/null; False when it cannot be read (the loader will say why, if it matters)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("readahead: %s: %s", path, exc)
        return False
    try:
        offset, size = 0, os.fstat(fd).st_size
        while offset < size:
            sent = os.sendfile(null, fd, offset, min(STEP, size - offset))
            if sent <= 0:
                break
            offset += sent
        return True
    except OSError as exc:
        log.debug("readahead: %s: %s", path, exc)
        return False
    finally:
        os.close(fd)
