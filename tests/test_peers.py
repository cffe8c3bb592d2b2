"""`--fan-out peers` on four sshd hosts: the origin serves each file once, the hosts copy verified files from each other.

Each host's sshd sits behind a byte-counting relay, so the tests count what
the control machine sends (commands and results, not weights). The peer
servers listen on the hosts' inventory address (127.0.0.1: the test hosts
share this machine's network), each on a port of its own.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_fleet import rows

from ops.models.lock import Lock, LockedFile, LockedModel, dump_lock
from ops.models.stamp import write_stamp
from testbed.helpers import HF_SHARDS, ROOT, Hub, Project, manifest
from testbed.proxy import Proxy, TcpCounter
from testbed.sshhosts import SshHost, counted, start_host

pytestmark = pytest.mark.hosts

INVOKE = [sys.executable, "-m", "invoke", "--search-root", str(ROOT)]
NAMES = ("p1", "p2", "p3", "p4")
SHARD = "model-00001-of-00004.safetensors"


@pytest.fixture(scope="module")
def hosts(keys: Path) -> Iterator[list[SshHost]]:
    started = [start_host(name, keys) for name in NAMES]
    yield started
    for h in started:
        h.stop()


@pytest.fixture(scope="module")
def relays(hosts: list[SshHost], keys: Path) -> Iterator[dict[str, TcpCounter]]:
    counters = counted(hosts, keys)
    yield counters
    for c in counters.values():
        c.stop()


@pytest.fixture(scope="module")
def project(hub: Hub, tmp_path_factory: pytest.TempPathFactory, relays: dict[str, TcpCounter], hosts: list[SshHost]) -> Project:
    p = Project(tmp_path_factory.mktemp("peers") / "project", hub.endpoint)
    p.dir.mkdir()
    p.write_manifest(manifest(shards=HF_SHARDS))
    assert p.run("lock", "--models", "shards").returncode == 0
    return p


def write_inventory(project: Project, keys: Path, relays: dict[str, TcpCounter], **host_vars: dict[str, object]) -> None:
    lines = ["all:", "  vars:", "    ansible_user: root", f"    ansible_ssh_private_key_file: {keys / 'id'}", "    models_dir: /srv/models", "  hosts:"]
    for name in NAMES:
        lines += [f"    {name}:", "      ansible_host: 127.0.0.1", f"      ansible_port: {relays[name].port}"]
        lines += [f"      {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in host_vars.get(name, {}).items()]
    (project.dir / "hosts.yml").write_text("\n".join(lines) + "\n")


def fleet_argv(project: Project, keys: Path, command: str, *flags: str, hosts: str = ",".join(NAMES)) -> list[str]:
    return [*INVOKE, command, "--inventory", str(project.dir / "hosts.yml"), "--lock", str(project.dir / "models.lock"), "--known-hosts", str(keys / "known_hosts"),
            "--hosts", hosts, "--models", "shards", *flags]


def fleet(project: Project, keys: Path, command: str, *flags: str, env: dict[str, str] | None = None, hosts: str = ",".join(NAMES)) -> subprocess.CompletedProcess[str]:
    return subprocess.run(fleet_argv(project, keys, command, *flags, hosts=hosts), env=env or project.env(), capture_output=True, text=True, timeout=600, check=False)


def clean(hosts: list[SshHost]) -> None:
    for h in hosts:
        h.exec("rm", "-rf", "/srv/models/shards", "/srv/models/.staging/shards")


def locked_files(project: Project) -> list[dict]:
    return tomllib.loads((project.dir / "models.lock").read_text())["models"]["shards"]["files"]


def origin_files(proxy: Proxy) -> list[str]:
    return sorted(req.path.rsplit("/", 1)[-1] for req in proxy.requests if "/resolve/" in req.path and req.method == "GET")


def assert_all_verified(project: Project, keys: Path) -> None:
    v = fleet(project, keys, "verify-models", "--full")
    assert v.returncode == 0, v.stdout + v.stderr
    assert all(rows(v.stdout)[(name, "shards")].startswith("verified (full)") for name in NAMES), v.stdout


def fetch_with_peers_through_counted_origin(project: Project, keys: Path, hub: Hub, *, origin_rate: float | None = None) -> None:
    """`--fan-out peers` onto every host: all downloaded, and the origin served each locked file exactly once."""
    proxy = Proxy(hub.endpoint, total_rate=origin_rate).start()
    try:
        r = fleet(project, keys, "fetch-models", "--fan-out", "peers", env=project.env(HF_ENDPOINT=proxy.url))
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(rows(r.stdout)[(name, "shards")].startswith("downloaded") for name in NAMES), r.stdout
    assert origin_files(proxy) == sorted(f["path"] for f in locked_files(project))


def peer_servers_left(hosts: list[SshHost]) -> list[str]:
    return [h.name for h in hosts if h.exec("pgrep", "-f", "peer-serve", check=False).returncode == 0]


def test_the_origin_serves_each_file_once_and_the_controller_carries_no_weights(project: Project, keys: Path, hosts: list[SshHost],
                                                                                  relays: dict[str, TcpCounter], hub: Hub) -> None:
    write_inventory(project, keys, relays)
    fleet(project, keys, "verify-models")  # bootstrap every host first: the count below is the fetch alone
    clean(hosts)
    for c in relays.values():
        c.sent = 0
    # A slow origin (1 MB/s for an 8 MB model): the first host takes ~8 s, and passes each file on as soon as it is verified.
    fetch_with_peers_through_counted_origin(project, keys, hub, origin_rate=1e6)
    model_size = sum(f["size"] for f in locked_files(project))
    sent = sum(c.sent for c in relays.values())
    assert sent < model_size, f"the control machine sent {sent} bytes over SSH for a {model_size}-byte model"
    assert_all_verified(project, keys)
    assert peer_servers_left(hosts) == []
    assert all(h.exec("sh", "-c", "ls -d /srv/models/.staging/shards/*.ready", check=False).returncode != 0 for h in hosts)  # links cleaned up
    # Some host had a file complete before the first host (which took everything from the origin) activated the model.
    activated = float(hosts[0].exec("stat", "-c", "%.9Y", "/srv/models/shards/current").stdout)
    first_copies = [min(float(t) for t in h.exec("sh", "-c", "stat -c %.9Y /srv/models/shards/current/*.safetensors").stdout.split()) for h in hosts[1:]]
    assert min(first_copies) < activated, (first_copies, activated)


def test_with_pieces_hosts_pass_on_each_verified_piece_in_stripes_and_the_origin_serves_each_file_once(project: Project, keys: Path,
                                                                                                      hosts: list[SshHost], relays: dict[str, TcpCounter],
                                                                                                      hub: Hub) -> None:
    write_inventory(project, keys, relays)
    fleet(project, keys, "verify-models")  # bootstrap every host first
    clean(hosts)
    pieces_lock = project.dir / "models-pieces.lock"
    r = project.run("lock", "--models", "shards", "--lock", str(pieces_lock), "--pieces", "64KiB", "--dest", str(project.dir / "seed"))
    assert r.returncode == 0, r.stdout + r.stderr
    proxy = Proxy(hub.endpoint, total_rate=1e6).start()  # 8 s for the 8 MB model: pieces pass on while the files still arrive
    try:
        argv = fleet_argv(project, keys, "fetch-models", "--fan-out", "peers", "--parallel", "4")
        argv[argv.index(str(project.dir / "models.lock"))] = str(pieces_lock)
        # Four hosts would make a chain (ops.remote.peers.fanout_stripes): two stripes, so each host takes from two others at once.
        r = subprocess.run(argv, env=project.env(HF_ENDPOINT=proxy.url, BAKEHOUSE_FANOUT_STRIPES="2"), capture_output=True, text=True, timeout=600, check=False)
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(rows(r.stdout)[(name, "shards")].startswith("downloaded") for name in NAMES), r.stdout
    assert origin_files(proxy) == sorted(f["path"] for f in locked_files(project))  # one copy from the origin
    assert "stripe by stripe" in r.stdout + r.stderr
    assert_all_verified(project, keys)
    assert peer_servers_left(hosts) == []
    assert all(h.exec("sh", "-c", "ls -d /srv/models/.staging/shards/*.pieces", check=False).returncode != 0 for h in hosts)  # records cleaned up


def test_a_peer_killed_mid_transfer_is_dropped_and_the_others_finish(project: Project, keys: Path, hosts: list[SshHost], relays: dict[str, TcpCounter],
                                                                     hub: Hub) -> None:
    write_inventory(project, keys, relays, p1={"peer_max_rate": 500_000})  # p1 serves slowly: the kill lands mid-file
    clean(hosts)
    run = subprocess.Popen(fleet_argv(project, keys, "fetch-models", "--fan-out", "peers"), env=project.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p1 = hosts[0]
    deadline = time.monotonic() + 120
    while p1.exec("test", "-s", "/opt/bakehouse/peer/port", check=False).returncode != 0:
        assert time.monotonic() < deadline and run.poll() is None, "p1's peer server never started"
        time.sleep(0.2)
    time.sleep(2)
    p1.exec("pkill", "-9", "-f", "peer-serve")
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, out + err
    table = rows(out)
    assert all(table[(name, "shards")].startswith("downloaded") for name in NAMES), out
    assert "peer p1" in table[("p2", "shards")] + table[("p3", "shards")], out
    assert_all_verified(project, keys)


def test_a_peer_serving_other_bytes_is_named_and_its_file_taken_elsewhere(project: Project, keys: Path, hosts: list[SshHost], relays: dict[str, TcpCounter],
                                                                         hub: Hub) -> None:
    write_inventory(project, keys, relays)
    clean(hosts)
    p1 = hosts[0]
    first = fleet(project, keys, "fetch-models", hosts="p1")
    assert first.returncode == 0, first.stdout + first.stderr
    # Change one byte of p1's copy and keep its size, inode and mtime: p1's quick check still trusts it, and it serves those bytes.
    p1.exec("sh", "-c", f'f=$(readlink -f /srv/models/shards/current)/{SHARD}; touch -r "$f" /tmp/ref; printf X | dd of="$f" bs=1 seek=4096 conv=notrunc 2>/dev/null; '
                        'touch -r /tmp/ref "$f"')
    r = fleet(project, keys, "fetch-models", "--fan-out", "peers")
    assert r.returncode == 0, r.stdout + r.stderr
    table = rows(r.stdout)
    assert table[("p1", "shards")].startswith("up-to-date"), r.stdout
    children = table[("p2", "shards")] + table[("p3", "shards")]
    assert "peer p1" in children and "other bytes than the lock pins" in children and SHARD in children, r.stdout
    for h in hosts[1:]:
        sha = h.exec("sh", "-c", f"sha256sum /srv/models/shards/current/{SHARD}").stdout.split()[0]
        assert sha == next(f["sha256"] for f in locked_files(project) if f["path"] == SHARD)


def test_a_host_whose_fetch_fails_stops_serving_and_the_hosts_behind_it_go_elsewhere(project: Project, keys: Path, hosts: list[SshHost],
                                                                                       relays: dict[str, TcpCounter]) -> None:
    write_inventory(project, keys, relays)
    clean(hosts)
    p1 = hosts[0]
    # A planted link where p1's model directory belongs: p1 serves (its commit is "still coming") until its fetch refuses the link.
    p1.exec("sh", "-c", "mkdir -p /srv/models && ln -s /tmp /srv/models/shards")
    try:
        r = fleet(project, keys, "fetch-models", "--fan-out", "peers")
    finally:
        p1.exec("rm", "-f", "/srv/models/shards")
    assert r.returncode == 1, r.stdout + r.stderr  # one host failed; the others did not wait on it until its server's deadline
    table = rows(r.stdout)
    assert table[("p1", "shards")].startswith("FAILED") and "symlink" in r.stdout, r.stdout
    assert r.stdout.count("warning: peer p1") <= 3, r.stdout  # each host behind p1 says once that it dropped it
    assert all(table[(name, "shards")].startswith("downloaded") for name in NAMES[1:]), r.stdout
    assert peer_servers_left(hosts) == []


def test_a_host_that_cannot_reach_its_peers_gets_the_files_through_the_controller(project: Project, keys: Path, hosts: list[SshHost],
                                                                                    relays: dict[str, TcpCounter], hub: Hub) -> None:
    write_inventory(project, keys, relays, p4={"peers": False})
    clean(hosts)
    fetch_with_peers_through_counted_origin(project, keys, hub)
    assert_all_verified(project, keys)


def test_dry_run_shows_the_plan_and_touches_nothing(project: Project, keys: Path, hosts: list[SshHost], relays: dict[str, TcpCounter]) -> None:
    write_inventory(project, keys, relays)
    clean(hosts)
    r = fleet(project, keys, "fetch-models", "--fan-out", "peers", "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "peer-serve" in r.stdout and "takes each file from p1 as soon as it has verified it" in r.stdout, r.stdout
    assert all(h.exec("test", "-e", "/srv/models/shards", check=False).returncode != 0 for h in hosts)


def test_fan_out_modes_are_exclusive(project: Project, keys: Path, relays: dict[str, TcpCounter]) -> None:
    write_inventory(project, keys, relays)
    r = fleet(project, keys, "fetch-models", "--fan-out", "peers", "--from-local")
    assert r.returncode == 2 and "choose one fan-out mode" in r.stderr, r.stdout + r.stderr
    bad = fleet(project, keys, "fetch-models", "--fan-out", "torrent")
    assert bad.returncode == 2 and "--fan-out" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_the_peer_server_serves_only_verified_files_to_holders_of_the_secret(tmp_path: Path) -> None:
    """A real `peer-serve` on loopback: the secret, Range, and every path that must not be served."""
    commit, secret = "c" * 40, "s" * 43
    store = tmp_path / "store"
    (store / "m" / commit).mkdir(parents=True)
    (store / "m" / commit / "w.bin").write_bytes(b"0123456789")
    write_stamp(store / "m" / commit, "0" * 16, {"w.bin": hashlib.sha256(b"0123456789").hexdigest()})  # verified: served as stamped
    (store / ".staging" / "m" / commit).mkdir(parents=True)
    (store / ".staging" / "m" / commit / "half.bin").write_bytes(b"unverified")
    fetching = "d" * 40  # a commit this host is still fetching with --share: one file verified so far
    ready = store / ".staging" / "m" / f"{fetching}.ready"
    ready.mkdir(parents=True)
    (ready / "early.bin").write_bytes(b"verified early")
    done = store / ".staging" / "m" / f"{commit}.ready"  # links of a fetch that has activated its commit since
    done.mkdir()
    os.link(store / "m" / commit / "w.bin", done / "w.bin")
    (tmp_path / "outside").write_text("not yours")
    (store / "m" / commit / "link").symlink_to(tmp_path / "outside")
    token, port_file, lock = tmp_path / "token", tmp_path / "port", tmp_path / "models.lock"
    token.write_text(secret)
    files = (LockedFile("early.bin", 14, "0" * 64), LockedFile("later.bin", 14, "0" * 64))
    lock.write_text(dump_lock(Lock(lock, {name: LockedModel(name, "hf://o/r", "main", c, "0" * 16, files)
                                          for name, c in (("m", fetching), ("other", commit))})))
    base = [sys.executable, "-m", "ops.models", "peer-serve", "--dest", str(store), "--bind", "127.0.0.1", "--token-file", str(token), "--port-file", str(port_file),
            "--lock", str(lock)]
    bad = subprocess.run([*base, "--port", "-1"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--port" in bad.stderr and "Traceback" not in bad.stderr
    server = subprocess.Popen(base, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert time.monotonic() < deadline and server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.05)
        assert not token.exists()  # read once and removed
        url = f"http://127.0.0.1:{port_file.read_text()}"
        auth = {"authorization": f"Bearer {secret}"}
        assert httpx.get(f"{url}/m/{commit}/w.bin").status_code == 401
        assert httpx.get(f"{url}/m/{commit}/w.bin", headers={"authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.get(f"{url}/m/{commit}/w.bin", headers=auth)
        assert ok.status_code == 200 and ok.content == b"0123456789"
        part = httpx.get(f"{url}/m/{commit}/w.bin", headers={**auth, "range": "bytes=4-"})
        assert part.status_code == 206 and part.content == b"456789"
        early = httpx.get(f"{url}/m/{fetching}/early.bin", headers=auth)
        assert early.status_code == 200 and early.content == b"verified early"
        asked = time.monotonic()
        assert httpx.head(f"{url}/m/{fetching}/later.bin", headers=auth).status_code == 425  # still on its way: ask again
        assert time.monotonic() - asked >= 1.5  # held a moment in case it lands, not answered at once
        landing = threading.Timer(0.5, lambda: (ready / "later.bin").write_bytes(b"verified later"))
        landing.start()
        held = httpx.get(f"{url}/m/{fetching}/later.bin", headers=auth)  # asked before it lands: answered with it once it does
        landing.join()
        assert held.status_code == 200 and held.content == b"verified later"
        assert httpx.head(f"{url}/m/{'e' * 40}/later.bin", headers=auth).status_code == 404  # a commit this host's lock does not pin: not coming
        for path in (f"m/{commit}/link", f"m/{commit}/..%2F..%2F..%2Foutside", f".staging/m/{commit}/half.bin", "m/current/w.bin", f"m/{commit}",
                     f"m/{commit}/%2Fetc%2Fpasswd", f"m/{commit}/missing.bin", f"m/{fetching}/..%2F{commit}%2Fw.bin"):
            r = httpx.get(f"{url}/{path}", headers=auth)
            assert r.status_code == 404, (path, r.status_code, r.text)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert not done.exists() and (store / "m" / commit / "w.bin").read_bytes() == b"0123456789"  # links of an activated commit go with the server
    assert (ready / "early.bin").exists()  # a fetch still under way keeps offering its files
