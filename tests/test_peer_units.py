"""Peer fan-out's pure parts: the schedule, the argv, the mode flags, and which store paths a peer may serve."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ops.cli import fan_out_for
from ops.errors import ConfigError
from ops.models.actions import check_peer
from ops.models.peer import file_path
from ops.remote.inventory import Host
from ops.remote.peers import FANOUT, Run, start_argv, stop_argv

COMMIT = "a" * 40


def test_each_finished_host_serves_at_most_fanout_peers_and_a_host_with_no_source_left_goes_to_the_origin() -> None:
    run = Run("h0")
    got: list[tuple[str | None, list[str]]] = []
    waiters = [threading.Thread(target=lambda: got.append(run.acquire())) for _ in range(FANOUT + 1)]
    for t in waiters:
        t.start()
    run.release("h0", None, "http://10.0.0.0:1")  # the root finished: it serves FANOUT peers at once, the next waits
    time.sleep(0.2)
    assert sorted(g[0] or "" for g in got) == ["h0"] * FANOUT and run.serving["h0"] == FANOUT
    run.release("h1", "h0", None)  # h1 failed: its slot on h0 frees, and it serves nothing
    for t in waiters:
        t.join(timeout=5)
    assert [g[0] for g in got] == ["h0"] * (FANOUT + 1) and "h1" not in run.urls
    run.release("h2", "h0", "http://10.0.0.2:1")
    assert run.acquire() == ("h2", ["http://10.0.0.2:1", "http://10.0.0.0:1"])  # the least busy source first, the others as fallbacks
    assert run.named("peer http://10.0.0.2:1 failed") == "peer h2 (http://10.0.0.2:1) failed"
    assert len(run.token) >= 32 and run.token != Run("x").token


def test_with_every_earlier_host_failed_a_host_goes_to_the_origin() -> None:
    run = Run("h0")
    run.release("h0", None, None)  # the root failed, nothing fetches now
    assert run.acquire() == (None, [])
    assert run.active == 1


def test_the_peer_server_argv_keeps_every_value_a_positional_argument() -> None:
    host = Host(name="g", address="10.0.0.9", prefix="/opt/bh", models_dir="/data/models", peer_max_rate=5_000_000)
    argv = start_argv(host, 120)
    assert argv[:2] == ["sh", "-c"] and "$1" in argv[2]
    assert argv[4:] == ["/opt/bh/venv/bin/python", "/data/models", "10.0.0.9", "/opt/bh/peer/token", "/opt/bh/peer/port", "120", "5000000",
                        "/opt/bh/peer/serve.log", "/opt/bh/peer/pid"]
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


def test_a_peer_serves_only_real_files_of_commit_directories(tmp_path: Path) -> None:
    (tmp_path / "m" / COMMIT / "sub").mkdir(parents=True)
    (tmp_path / "m" / COMMIT / "sub" / "w.bin").write_bytes(b"x")
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", tmp_path / "m" / COMMIT / "link")
    os.symlink(tmp_path / "m" / COMMIT, tmp_path / "m" / ("b" * 40))
    assert file_path(tmp_path, "m", COMMIT, "sub/w.bin") == tmp_path / "m" / COMMIT / "sub" / "w.bin"
    for name, commit, path in [("m", COMMIT, "link"), ("m", "b" * 40, "sub/w.bin"), ("m", COMMIT, "../../secret"), ("m", COMMIT, "sub"),
                               ("..", COMMIT, "secret"), ("m", "current", "sub/w.bin"), (".staging", COMMIT, "x"), ("m", COMMIT, "missing")]:
        assert file_path(tmp_path, name, commit, path) is None, (name, commit, path)
