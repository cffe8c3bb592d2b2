"""app.readahead: the verified weights into the page cache in the background, on real files (residency read with util-linux's fincore)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from app.readahead import memory_available, start_readahead
from ops.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("fincore") is None, reason="util-linux's fincore reads page-cache residency")


def resident(path: Path) -> int:
    return int(subprocess.run(["fincore", "-b", "-n", "-r", "-o", "RES", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def evicted(path: Path, size: int) -> Path:
    """A file of `size` random bytes on disk and out of the page cache."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def test_the_weights_are_read_into_the_page_cache(tmp_path: Path) -> None:
    a, b = evicted(tmp_path / "a.safetensors", 8 << 20), evicted(tmp_path / "b.safetensors", 3 << 20)
    if resident(a) > 1 << 20:
        pytest.skip("this filesystem keeps the file cached whatever is advised")
    thread = start_readahead(tmp_path, [("a.safetensors", 8 << 20), ("b.safetensors", 3 << 20)])
    assert thread is not None
    thread.join(30)
    assert resident(a) == 8 << 20 and resident(b) == 3 << 20


def test_a_planted_link_is_not_followed_and_the_rest_is_left(tmp_path: Path) -> None:
    outside = evicted(tmp_path / "outside", 4 << 20)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.safetensors").symlink_to(outside)
    after = evicted(tmp_path / "model" / "b.safetensors", 4 << 20)
    if resident(outside) > 1 << 20:
        pytest.skip("this filesystem keeps the file cached whatever is advised")
    thread = start_readahead(tmp_path / "model", [("a.safetensors", 4 << 20), ("b.safetensors", 4 << 20)])
    assert thread is not None
    thread.join(30)
    assert resident(outside) < 1 << 20 and resident(after) < 1 << 20  # it stops at the first file it cannot read


def test_off_or_too_large_for_memory_reads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert start_readahead(tmp_path, [("a", 1 << 60)]) is None  # more than half the memory available
    assert start_readahead(tmp_path, []) is None
    monkeypatch.setenv("BAKEHOUSE_READAHEAD", "0")
    assert start_readahead(tmp_path, [("a", 1)]) is None
    for bad in ("-1", "../x", "yes please"):
        monkeypatch.setenv("BAKEHOUSE_READAHEAD", bad)
        with pytest.raises(ConfigError, match="BAKEHOUSE_READAHEAD"):
            start_readahead(tmp_path, [("a", 1)])


@pytest.mark.parametrize(("text", "expected"), [("MemTotal: 100 kB\nMemAvailable:   2048 kB\n", 2 << 20), ("MemTotal: 100 kB\n", 0),
                                                ("MemAvailable: lots\n", 0), ("MemAvailable:\n", 0)])
def test_memory_available_is_read_from_meminfo(tmp_path: Path, text: str, expected: int) -> None:
    (tmp_path / "meminfo").write_text(text)
    assert memory_available(tmp_path / "meminfo") == expected
    assert memory_available(tmp_path / "missing") == 0
