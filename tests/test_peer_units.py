"""Peer fan-out's parts: the schedule, the argv, the mode flags, which store paths a peer may serve, and taking a file from a peer (real HTTP on loopback)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from ops.cli import fan_out_for
from ops.errors import ConfigError, SourceUnreachableError, VerificationError
from ops.models.actions import check_peer
from ops.models.lock import LockedFile
from ops.models.peer_client import take_file
from ops.models.peer_server import file_path, still_coming
from ops.models.sources.base import FetchJob
from ops.remote.inventory import Host
from ops.remote.peers import FANOUT, Run, start_argv, stop_argv

COMMIT = "a" * 40


def joined(run: Run, *names: str) -> Run:
    for name in names:
        run.join(name, f"http://10.0.0.{name[1:]}:1")
    return run


def test_each_host_takes_files_from_the_earliest_host_before_it_with_a_free_slot() -> None:
    run = joined(Run("h0"), "h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7")
    got = {name: run.acquire(name)[0] for name in run.order}
    # A shallow tree: the root feeds two hosts, each of them two more, and so on; nothing waits while every host joins.
    assert got == {"h0": None, "h1": "h0", "h2": "h0", "h3": "h1", "h4": "h1", "h5": "h2", "h6": "h2", "h7": "h3"}
    assert max(run.serving.values()) == FANOUT
    assert run.named("peer http://10.0.0.2:1 failed") == "peer h2 (http://10.0.0.2:1) failed"
    assert len(run.token) >= 32 and run.token != Run("x").token


def test_the_fallbacks_are_the_live_hosts_before_it_so_no_two_hosts_wait_on_each_other() -> None:
    run = joined(Run("h0"), "h0", "h1", "h2", "h3")
    for name in ("h1", "h2"):
        run.acquire(name)
    run.release("h1", "h0", ok=False)  # h1 failed: its slot on h0 frees, and nobody takes files from it any more
    source, urls = run.acquire("h3")
    assert source == "h0" and urls == ["http://10.0.0.0:1", "http://10.0.0.2:1"]  # h2 joined before h3: a fallback; h1 is gone


def test_a_full_source_makes_the_next_host_wait_until_a_slot_frees() -> None:
    run = joined(Run("h0"), "h0", "h1", "h2")
    run.serving["h0"] = FANOUT
    run.serving["h1"] = run.serving["h2"] = FANOUT
    run.join("h3", "http://10.0.0.3:1")
    got: list[tuple[str | None, list[str]]] = []
    waiter = threading.Thread(target=lambda: got.append(run.acquire("h3")))
    waiter.start()
    time.sleep(0.2)
    assert got == []
    run.release("h9", "h1", ok=True)  # a host fed by h1 finished
    waiter.join(timeout=5)
    assert got and got[0][0] == "h1"


def test_hosts_join_after_the_root_and_with_every_host_before_it_failed_a_host_goes_to_the_origin() -> None:
    run = Run("h0")
    early = threading.Thread(target=lambda: run.join("h1", "http://10.0.0.1:1"))
    early.start()
    time.sleep(0.2)
    assert run.order == []  # h1 was ready first, but waits for the root
    run.release("h0", None, ok=False)  # the root failed before it served anything
    early.join(timeout=5)
    assert run.order == ["h1"] and run.acquire("h1") == (None, [])  # h1 goes to the origin; the others can take from it
    joined(run, "h2")
    assert run.acquire("h2")[0] == "h1"


def test_the_peer_server_argv_keeps_every_value_a_positional_argument() -> None:
    host = Host(name="g", address="10.0.0.9", prefix="/opt/bh", models_dir="/data/models", peer_max_rate=5_000_000)
    argv = start_argv(host, 120)
    assert argv[:2] == ["sh", "-c"] and "$1" in argv[2]
    assert argv[4:] == ["/opt/bh/venv/bin/python", "/data/models", "10.0.0.9", "/opt/bh/peer/token", "/opt/bh/peer/port", "120", "5000000",
                        "/opt/bh/peer/serve.log", "/opt/bh/peer/pid", "/opt/bh/models.lock"]
    assert '--lock "${10}"' in argv[2]
    assert stop_argv(host)[-1] == "/opt/bh/peer"


def test_one_fan_out_mode_at_a_time() -> None:
    assert fan_out_for("peers", from_local=False, from_host=None, dest="/m").mode == "peers"  # type: ignore[union-attr]
    assert fan_out_for(None, from_local=True, from_host=None, dest="/m").mode == "local"  # type: ignore[union-attr]
    assert fan_out_for(None, from_local=False, from_host="h1", dest=None).from_host == "h1"  # type: ignore[union-attr]
    assert fan_out_for(None, from_local=False, from_host=None, dest=None) is None
    with pytest.raises(ConfigError, match="choose one fan-out mode"):
        fan_out_for("peers", from_local=True, from_host=None, dest=None)
    with pytest.raises(ConfigError, match="--fan-out"):
        fan_out_for("host", from_local=False, from_host=None, dest=None)  # needs a host: --from-host


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://[fd00::1]:9", "http://gpu-1.example:65535"])
def test_peer_addresses(url: str) -> None:
    assert check_peer(url) == url


@pytest.mark.parametrize("url", ["https://x:1", "http://x", "http://u:p@x:1", "http://x:1/path", "--upload-pack=x", "http://x:1 http://y:2"])
def test_bad_peer_addresses_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="--peers"):
        check_peer(url)


def test_a_peer_serves_only_real_files_of_commit_directories_as_verified(tmp_path: Path) -> None:
    from ops.models.stamp import write_stamp

    commit_dir = tmp_path / "m" / COMMIT
    (commit_dir / "sub").mkdir(parents=True)
    (commit_dir / "sub" / "w.bin").write_bytes(b"x")
    write_stamp(commit_dir, "digest", {"sub/w.bin": hashlib.sha256(b"x").hexdigest()})
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", commit_dir / "link")
    os.symlink(commit_dir, tmp_path / "m" / ("b" * 40))
    os.link(tmp_path / "secret", commit_dir / "planted")  # a hard link put there after the verify: not in the stamp
    assert file_path(tmp_path, "m", COMMIT, "sub/w.bin") == commit_dir / "sub" / "w.bin"
    for name, commit, path in [("m", COMMIT, "link"), ("m", "b" * 40, "sub/w.bin"), ("m", COMMIT, "../../secret"), ("m", COMMIT, "sub"),
                               ("..", COMMIT, "secret"), ("m", "current", "sub/w.bin"), (".staging", COMMIT, "x"), ("m", COMMIT, "missing"),
                               ("m", COMMIT, "planted")]:
        assert file_path(tmp_path, name, commit, path) is None, (name, commit, path)
    (commit_dir / "sub" / "w.bin").unlink()
    os.link(tmp_path / "secret", commit_dir / "sub" / "w.bin")  # the verified file replaced by a hard link to another: another inode
    assert file_path(tmp_path, "m", COMMIT, "sub/w.bin") is None


def test_a_file_verified_by_a_fetch_in_progress_is_served_and_one_still_coming_is_425(tmp_path: Path) -> None:
    ready = tmp_path / ".staging" / "m" / f"{COMMIT}.ready"
    ready.mkdir(parents=True)
    (ready / "w.bin").write_bytes(b"x")
    (tmp_path / ".staging" / "m" / COMMIT).mkdir()
    (tmp_path / ".staging" / "m" / COMMIT / "half.bin").write_bytes(b"unverified")  # in staging, not offered: not served
    locked = {("m", COMMIT, "w.bin"): 1, ("m", COMMIT, "half.bin"): 10}
    assert file_path(tmp_path, "m", COMMIT, "w.bin", locked) == ready / "w.bin"
    assert file_path(tmp_path, "m", COMMIT, "w.bin") is None  # a server with no lock serves only verified commit directories
    assert file_path(tmp_path, "m", COMMIT, "w.bin", {("m", COMMIT, "w.bin"): 2}) is None  # not the lock's size
    coming = {("m", COMMIT)}  # what this host's lock pins
    assert file_path(tmp_path, "m", COMMIT, "half.bin") is None and still_coming(tmp_path, "m", COMMIT, "half.bin", coming)
    assert not still_coming(tmp_path, "m", COMMIT, "../x", coming) and not still_coming(tmp_path, "m", "current", "w.bin", coming)
    assert not still_coming(tmp_path, "m", "b" * 40, "w.bin", coming) and not still_coming(tmp_path, "n", COMMIT, "w.bin", coming)  # not this host's fetch
    assert not still_coming(tmp_path, "m", COMMIT, "half.bin", ())  # a server started without a lock never says "not yet"
    (tmp_path / "m" / COMMIT).mkdir(parents=True)  # activated here: what it lacks now it will never have
    assert not still_coming(tmp_path, "m", COMMIT, "half.bin", coming)


def test_a_planted_link_for_the_ready_directory_is_never_served(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.bin").write_bytes(b"not verified")
    (tmp_path / ".staging" / "m").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", tmp_path / ".staging" / "m" / f"{COMMIT}.ready")
    assert file_path(tmp_path, "m", COMMIT, "w.bin") is None


class HostilePeer(ThreadingHTTPServer):
    """A peer on loopback that serves `body` (honouring Range if `ranges`, from `skew` bytes further on than asked), or bytes
    without end; it records the Range asked for."""

    def __init__(self, body: bytes | None, *, ranges: bool = True, skew: int = 0) -> None:
        self.body, self.ranges, self.skew, self.asked = body, ranges, skew, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                asked = self.headers.get("range")
                server.asked.append(asked)
                if server.body is None:
                    self.send_response(200)
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        while True:
                            self.wfile.write(b"\0" * 65536)
                    return
                start = int(asked.removeprefix("bytes=").rstrip("-")) + server.skew if asked and server.ranges else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("content-range", f"bytes {start}-{len(server.body) - 1}/{len(server.body)}")
                self.send_header("content-length", str(len(server.body) - start))
                self.end_headers()
                self.wfile.write(server.body[start:])

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()  # nothing listens any more: a connection is refused

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/m/{COMMIT}/w.bin"


def job_in(tmp_path: Path) -> FetchJob:
    return FetchJob(root=tmp_path, staging=tmp_path / "staging", partial=tmp_path / "partial", progress=SimpleNamespace(update=lambda n: None))  # type: ignore[arg-type]


BODY = os.urandom(3 << 20)
LOCKED = LockedFile(path="w.bin", size=len(BODY), sha256=hashlib.sha256(BODY).hexdigest())


@pytest.mark.parametrize("ranges", [True, False])
def test_a_file_from_a_peer_resumes_from_the_bytes_already_here(tmp_path: Path, ranges: bool) -> None:
    """With Range where the peer honours it; a peer that sends the whole file again is taken from the start."""
    job = job_in(tmp_path)
    job.partial.mkdir()
    (job.partial / "w.bin").write_bytes(BODY[:1000])
    peer = HostilePeer(BODY, ranges=ranges)
    try:
        assert take_file(peer.url, {}, LOCKED, job, peer="p") == LOCKED.sha256
    finally:
        peer.stop()
    assert peer.asked == ["bytes=1000-"] and (job.staging / "w.bin").read_bytes() == BODY


def test_a_peer_answering_from_another_offset_than_asked_is_refused_before_a_byte_is_written(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    job.partial.mkdir()
    (job.partial / "w.bin").write_bytes(BODY[:1000])
    peer = HostilePeer(BODY, skew=500)
    try:
        with pytest.raises(SourceUnreachableError, match=r"peer p: w.bin: answered from bytes 1500-\d+/\d+, not from byte 1000"):
            take_file(peer.url, {}, LOCKED, job, peer="p")
    finally:
        peer.stop()
    assert (job.partial / "w.bin").read_bytes() == BODY[:1000]  # kept as it was: the next peer resumes from here


def test_a_peer_sending_bytes_without_end_fills_no_disk_and_nothing_is_kept(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    peer = HostilePeer(None)
    try:
        with pytest.raises(VerificationError, match=r"models\.lock pins"):
            take_file(peer.url, {}, LOCKED, job, peer="p")
    finally:
        peer.stop()
    assert not (job.partial / "w.bin").exists() and not (job.staging / "w.bin").exists()


def test_a_peer_that_stops_early_or_refuses_is_a_source_error_naming_it(tmp_path: Path) -> None:
    job = job_in(tmp_path)
    short = LockedFile(path="w.bin", size=len(BODY) + 10, sha256=LOCKED.sha256)
    peer = HostilePeer(BODY)
    try:
        with pytest.raises(SourceUnreachableError, match=f"peer p: w.bin: ended after {len(BODY)} of {len(BODY) + 10} bytes"):
            take_file(peer.url, {}, short, job, peer="p")
    finally:
        peer.stop()
    assert (job.partial / "w.bin").stat().st_size == len(BODY)  # kept: the next peer resumes from here
    (tmp_path / "b").mkdir()
    with pytest.raises(SourceUnreachableError, match=r"peer q: w\.bin: ConnectionRefusedError"):
        take_file(peer.url, {}, LOCKED, job_in(tmp_path / "b"), peer="q")  # the server is gone: connection refused


@pytest.mark.slow
def test_the_peer_server_wants_bearer_closes_slow_and_surplus_connections_and_stops_at_its_deadline(tmp_path: Path) -> None:
    import http.client
    import socket
    import subprocess
    import sys

    from ops.models.peer_server import FIRST_REQUEST_SECONDS, PER_CLIENT
    from ops.models.stamp import write_stamp

    commit_dir = tmp_path / "store" / "m" / COMMIT
    commit_dir.mkdir(parents=True)
    (commit_dir / "w.bin").write_bytes(b"weights")
    write_stamp(commit_dir, "digest", {"w.bin": hashlib.sha256(b"weights").hexdigest()})
    token = "t" * 32
    (tmp_path / "token").write_text(token)
    seconds = FIRST_REQUEST_SECONDS + 8
    proc = subprocess.Popen([sys.executable, "-m", "ops.models", "peer-serve", "--dest", str(tmp_path / "store"), "--bind", "127.0.0.1",
                             "--token-file", str(tmp_path / "token"), "--port-file", str(tmp_path / "port"), "--seconds", str(seconds)])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "port").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        port = int((tmp_path / "port").read_text())
        started = time.monotonic()

        def get(auth: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", f"/m/{COMMIT}/w.bin", headers={"authorization": auth})
            status = conn.getresponse().status
            conn.close()
            return status

        assert get(f"Bearer {token}") == 200 and get(token) == 401 and get(f"Basic {token}") == 401
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(PER_CLIENT + 4)]
        time.sleep(0.5)
        closed = []
        for s in idle:
            s.settimeout(0.2)
            try:
                closed.append(s.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
        assert closed.count(True) >= 4 and closed[:PER_CLIENT].count(False) >= PER_CLIENT - 4  # the surplus is closed at once
        time.sleep(FIRST_REQUEST_SECONDS + 0.5)
        for s in idle:  # silent connections are closed after FIRST_REQUEST_SECONDS
            s.settimeout(2)
            assert s.recv(1) == b""
            s.close()
        assert get(f"Bearer {token}") == 200
        time.sleep(max(0.0, seconds - (time.monotonic() - started)) + 2)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
