"""Large files by concurrent ranged GETs, against a real origin that honours Range and against hostile ones on loopback.

The chunk size and the size from which a file is ranged are lowered (BAKEHOUSE_RANGE_CHUNK_BYTES, BAKEHOUSE_RANGED_MIN_BYTES) so
files of a few MB exercise the same code as the 16 MiB chunks of a 10 GB shard.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.helpers import ROOT, Project
from testbed.origin import Origin

SIZE = 40 * (1 << 20) + 12345  # 40 chunks and a short last one
BODY = os.urandom(SIZE)
SMALL = {"BAKEHOUSE_RANGE_CHUNK_BYTES": str(1 << 20), "BAKEHOUSE_RANGED_MIN_BYTES": str(2 << 20), "BAKEHOUSE_RANGES": "4"}


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin(BODY).start()
    yield o
    o.stop()


def project_for(origin: Origin, tmp_path: Path) -> Project:
    p = Project(tmp_path / "project", "http://127.0.0.1:9")
    p.dir.mkdir()
    p.write_manifest(f'[models.big]\nsource = "{origin.url}"\nsha256 = "{hashlib.sha256(BODY).hexdigest()}"\n')
    assert p.run("lock", "--models", "big").returncode == 0
    return p


def fetch(p: Project, **env: str) -> subprocess.CompletedProcess[str]:
    return p.run("fetch", "--models", "big", env=p.env(**SMALL, **env))


def served(p: Project) -> bytes:
    return (p.store / "big" / "current" / "weights.safetensors").read_bytes()


def test_a_large_file_comes_in_concurrent_ranges_and_is_verified(origin: Origin, tmp_path: Path) -> None:
    p = project_for(origin, tmp_path)
    r = fetch(p)
    assert r.returncode == 0, r.stdout + r.stderr
    assert served(p) == BODY
    asked = sorted(x for x in origin.ranges if x)
    assert len(asked) == 41 and asked[0] == f"bytes=0-{(1 << 20) - 1}" and origin.sent == SIZE  # every byte once, in 41 ranges
    assert origin.connections <= 4 + 1  # each of the 4 workers keeps its connection from chunk to chunk (the +1: the lock's HEAD)
    assert not list((p.store / ".staging").rglob("*.ranges")) or not any(f.is_file() for f in (p.store / ".staging").rglob("*"))


@pytest.mark.parametrize(("mode", "code", "needle"), [
    ("ignore-range", 0, ""),  # the sequential download takes over
    ("extra-bytes", 0, ""),  # never more than asked is read
    ("close-early-once", 0, ""),  # each chunk is tried again
    ("drop-idle", 0, ""),  # a kept connection the server closed meanwhile is replaced
    ("wrong-range", 3, "when asked for"),
    ("other-bytes", 1, "models.lock pins"),
])
def test_a_hostile_origin_gives_the_right_bytes_or_a_clear_error_and_nothing_activated(tmp_path: Path, mode: str, code: int, needle: str) -> None:
    origin = Origin(BODY, mode=mode).start()
    try:
        p = project_for(origin, tmp_path)
        r = fetch(p)
    finally:
        origin.stop()
    assert r.returncode == code, r.stdout + r.stderr
    assert needle in r.stdout + r.stderr and "Traceback" not in r.stderr
    if code == 0:
        assert served(p) == BODY
    else:
        assert not (p.store / "big" / "current").exists()


def test_kill_9_mid_fetch_then_resume_takes_only_the_missing_chunks(tmp_path: Path) -> None:
    origin = Origin(BODY, rate=4e6).start()  # 4 MB/s a response, 4 at once: about three seconds for the whole file
    try:
        p = project_for(origin, tmp_path)
        proc = subprocess.Popen([sys.executable, "-m", "ops.models", "fetch", "--models", "big"], cwd=p.dir, env={**p.env(**SMALL), "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while origin.sent < SIZE // 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = origin.sent
        assert killed_at < SIZE, "the fetch ended before it was killed: slow the origin down"
        r = fetch(p)
        assert r.returncode == 0, r.stdout + r.stderr
        assert served(p) == BODY
        # Everything written before the kill is kept. What is fetched twice is what was in flight: at most an eighth of a chunk written
        # but not yet recorded, and what the origin had put in the socket buffers and the killed fetch never read (on a loaded machine,
        # up to a few MB a connection): bounded by 2 chunks a request. A fetch that started over would take the whole file again.
        assert origin.sent - SIZE <= 2 * 4 * (1 << 20), (origin.sent, killed_at, SIZE)
    finally:
        origin.stop()


@pytest.mark.parametrize("direct", ["1", "0"])  # with O_DIRECT, and through the page cache
def test_a_large_file_from_nginx_comes_in_ranges_and_activates(tmp_path: Path, direct: str) -> None:
    from testbed.nginx import Nginx

    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "weights.safetensors").write_bytes(BODY)
    with Nginx(tmp_path / "www", tmp_path / "nginx") as nginx:
        p = Project(tmp_path / "project", "http://127.0.0.1:9")
        p.dir.mkdir()
        p.write_manifest(f'[models.big]\nsource = "{nginx.url}/files/weights.safetensors"\nsha256 = "{hashlib.sha256(BODY).hexdigest()}"\n')
        assert p.run("lock", "--models", "big").returncode == 0
        r = fetch(p, BAKEHOUSE_DIRECT_IO=direct)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (served(p) == BODY and not (p.store / ".staging" / "big").exists()) or not any((p.store / ".staging" / "big").rglob("*.safetensors"))


def test_a_kept_connection_the_server_closed_is_replaced_without_costing_an_attempt() -> None:
    from ops.models.sources.ranged import Connection, Target, fetch_chunk

    origin = Origin(BODY, mode="drop-idle").start()
    try:
        connection, buffer = Connection(), memoryview(bytearray(1 << 16))
        for start in (0, 1 << 16, 2 << 16):  # each on the connection the last one left open, which the server has closed
            fetch_chunk(Target(origin.url, {}), start, 1 << 16, buffer, lambda: False, "origin", connection=connection)
            assert bytes(buffer) == BODY[start : start + (1 << 16)]
        assert origin.connections == 3
    finally:
        origin.stop()


def test_chunks_reuse_one_connection_a_worker() -> None:
    from ops.models.sources.ranged import Connection, Target, fetch_chunk

    origin = Origin(BODY).start()
    try:
        connection, buffer = Connection(), memoryview(bytearray(1 << 16))
        for start in (0, 1 << 16, 2 << 16):
            fetch_chunk(Target(origin.url, {}), start, 1 << 16, buffer, lambda: False, "origin", connection=connection)
        assert origin.connections == 1
    finally:
        origin.stop()


def test_a_direct_write_the_kernel_refuses_falls_back_to_the_page_cache(tmp_path: Path) -> None:
    import mmap

    from ops.models.sources.ranged import Disk

    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        disk = Disk(fd, direct=True)
        if not disk.direct:
            pytest.skip("this filesystem takes no O_DIRECT")
        buffer = memoryview(mmap.mmap(-1, 3 << 12))
        buffer[:] = os.urandom(3 << 12)
        assert disk.write(buffer, 0, 0, 5000, last=False) == 4096  # a whole block now, the rest with a later write
        assert disk.write(buffer[1:], 4096, 0, 8192, last=False) == 8192  # not aligned in memory: EINVAL, then the page cache
        assert not disk.direct
        assert disk.write(buffer, 12288, 0, 100, last=True) == 100
        disk.close()
        data = path.read_bytes()
        assert data[:4096] == bytes(buffer[:4096]) and data[4096:12288] == bytes(buffer[1:8193]) and data[12288:] == bytes(buffer[:100])
    finally:
        os.close(fd)


def test_chunk_buffers_are_bounded_and_reused() -> None:
    from ops.models.sources.ranged import Buffers

    pool = Buffers(1 << 16, 2)
    a, b = pool.take(lambda: False), pool.take(lambda: False)
    assert a is not None and b is not None
    assert pool.take(lambda: True) is None  # all in use: waits, and gives up once the fetch is over
    pool.give(a)
    assert pool.take(lambda: False) is a and pool.made == 2


@pytest.mark.parametrize("direct", [True, False])
def test_a_disk_that_fills_mid_chunk_is_an_error_never_a_short_file(tmp_path: Path, direct: bool) -> None:
    """The hash is taken from the buffer: a write cut short by a full disk must fail the chunk, not pass for a whole one."""
    import errno
    import mmap

    from ops.models.sources.ranged import Disk

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT)
        disk = Disk(fd, direct=direct)
        buffer = memoryview(mmap.mmap(-1, 2 << 20))
        with pytest.raises(OSError) as caught:
            disk.write(buffer, 0, 0, 2 << 20, last=True)
        assert caught.value.errno == errno.ENOSPC
        disk.close()
        os.close(fd)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_bad_direct_io_value_is_a_usage_error_and_nothing_activated(origin: Origin, tmp_path: Path) -> None:
    p = project_for(origin, tmp_path)
    r = fetch(p, BAKEHOUSE_DIRECT_IO="-rf")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "BAKEHOUSE_DIRECT_IO='-rf' is not a yes/no value" in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert not (p.store / "big" / "current").exists()
