"""SSH to hosts (Fabric connections, each command on a channel of its host's one connection), with known host keys checked: the one place remote commands run."""

from __future__ import annotations

import codecs
import contextlib
import functools
import os
import select
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paramiko
from fabric import Config, Connection
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from ops.errors import HostAuthError, HostKeyError, HostUnreachableError, RemoteTimeoutError, redact
from ops.remote.inventory import Host
from ops.settings import choice

HostKeyPolicy = Literal["strict", "accept-new"]
HOST_KEY_POLICIES: tuple[HostKeyPolicy, ...] = ("strict", "accept-new")


KNOWN_HOSTS = Path("~/.ssh/known_hosts").expanduser()


@dataclass(frozen=True)
class SshOptions:
    known_hosts: Path = KNOWN_HOSTS
    host_key_policy: HostKeyPolicy = "strict"  # accept-new: trust and record a first-contact key, as `ssh -o StrictHostKeyChecking=accept-new`
    connect_timeout: float = 10.0
    command_timeout: float | None = None

    def __post_init__(self) -> None:
        choice("--host-keys", self.host_key_policy, HOST_KEY_POLICIES)


@dataclass(frozen=True)
class RemoteResult:
    exit_code: int
    stdout: str
    stderr: str


class KnownHosts:
    """A known_hosts file parsed once, indexed by host name. paramiko's HostKeys drops duplicate lines by checking every
    line against all before it, and its lookup walks every line: both grew with the fleet, once per host."""

    def __init__(self, path: Path) -> None:
        self.by_name: dict[str, dict[str, paramiko.PKey]] = {}
        self.hashed: list[HostKeyEntry] = []  # HashKnownHosts lines: matched by hashing the name with each line's salt
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entry = HostKeyEntry.from_line(line.strip(), lineno)
            except (paramiko.SSHException, InvalidHostKey):
                continue  # a line no one can read is skipped, as ssh does
            if entry is None:
                continue
            if any(name.startswith("|1|") for name in entry.hostnames):
                self.hashed.append(entry)
            for name in entry.hostnames:
                if not name.startswith("|1|"):
                    self.by_name.setdefault(name, {}).setdefault(entry.key.get_name(), entry.key)

    def lookup(self, name: str) -> dict[str, paramiko.PKey]:
        """The host's keys by type; {} if it has none."""
        keys = dict(self.by_name.get(name, {}))
        for entry in self.hashed:
            if any(h.startswith("|1|") and paramiko.HostKeys.hash_host(name, h) == h for h in entry.hostnames):
                keys.setdefault(entry.key.get_name(), entry.key)
        return keys

    def __len__(self) -> int:
        return len(self.by_name) + len(self.hashed)


_KNOWN_HOSTS: dict[Path, tuple[int, KnownHosts]] = {}
_KNOWN_HOSTS_LOCK = threading.Lock()


def known_hosts(path: Path) -> KnownHosts:
    """known_hosts parsed once per process (again when the file changes): paramiko's parse is quadratic in the file's lines,
    and parsing it for every host made the controller's CPU per host grow with the fleet."""
    with _KNOWN_HOSTS_LOCK:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return KnownHosts(path)  # none yet
        cached = _KNOWN_HOSTS.get(path)
        if cached is None or cached[0] != mtime:
            cached = _KNOWN_HOSTS[path] = (mtime, KnownHosts(path))
        return cached[1]


def host_key_name(host: Host) -> str:
    """How known_hosts names the host (as OpenSSH and paramiko do): the address, with the port when it is not 22."""
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def _remember(path: Path, name: str, keys: paramiko.HostKeys) -> None:
    """accept-new: append this host's first-contact key (under a lock: hosts connect in parallel, and a rewrite of the whole file lost keys)."""
    entries: Mapping[str, paramiko.PKey] = keys.lookup(name) or {}
    with _KNOWN_HOSTS_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(f"{name} {keytype} {key.get_base64()}\n" for keytype, key in entries.items())
        _KNOWN_HOSTS.pop(path, None)


# Once a connection is up, its reader thread wakes this often to see whether it was closed (paramiko's 0.1 s made about
# 20,000 wake-ups in a 100-host verify at --parallel 32); data still wakes it at once, and close() does not wait for it.
IDLE_WAKE_SECONDS = 1.0


AEAD_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    """A transport that offers AES-GCM first (OpenSSH has it since 6.2): its integrity check is done by the cipher, in C;
    with paramiko's default AES-CTR, each packet's MAC is compared byte by byte in Python."""
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    options.ciphers = (*AEAD_CIPHERS, *(c for c in options.ciphers if c not in AEAD_CIPHERS))
    return transport


@functools.cache
def _config() -> Config:
    """One Fabric configuration for every connection: building one per host (two invoke configurations, ~/.ssh/config read)
    was the controller's largest CPU cost per host after the key exchange."""
    return Config()


def connect(host: Host, opts: SshOptions) -> Connection:
    """Open an SSH connection whose host key is checked against known_hosts."""
    key = os.path.expanduser(host.key_file) if host.key_file else None
    conn = Connection(
        host.address,
        user=host.user,
        port=host.port,
        config=_config(),
        connect_timeout=opts.connect_timeout,
        connect_kwargs={"key_filename": [key] if key else None, "look_for_keys": key is None, "allow_agent": key is None, "transport_factory": _transport},
    )
    client = conn.client
    name = host_key_name(host)
    known = known_hosts(opts.known_hosts).lookup(name)
    client.get_host_keys().clear()  # only this host's entries: the client looks its key up in them
    for keytype, pkey in known.items():
        client.get_host_keys().add(name, keytype, pkey)
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if opts.host_key_policy == "accept-new" else paramiko.RejectPolicy())
    where = f"{host.address}:{host.port}"
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(f"the host key does not match {opts.known_hosts}. If the host was rebuilt, remove its old key (ssh-keygen -R); "
                           "otherwise stop: this may not be your host.", host=host.name) from exc
    except paramiko.AuthenticationException as exc:
        raise HostAuthError(f"SSH authentication refused for {host.user}@{where}. Check ansible_user and ansible_ssh_private_key_file.",
                            host=host.name, step="connect") from exc
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(f"unknown host key ({where} is not in {opts.known_hosts}). Add it (ssh-keyscan) or pass --host-keys accept-new for first contact.",
                               host=host.name) from exc
        raise HostUnreachableError(f"SSH failed ({exc}).", host=host.name, step="connect") from exc
    except OSError as exc:
        raise HostUnreachableError(f"cannot reach {where} ({exc.strerror or exc}). Is the host up and sshd listening?", host=host.name, step="connect") from exc
    if opts.host_key_policy == "accept-new" and not known:
        _remember(opts.known_hosts, name, client.get_host_keys())
    conn.transport.sock.settimeout(IDLE_WAKE_SECONDS)
    return conn


class Output:
    """Remote output kept whole and, for stderr, handed on line by line as it arrives (decoded across packet boundaries)."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line, self.pending = on_line, ""
        self.chunks: list[str] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes, *, final: bool = False) -> None:
        text = self.decoder.decode(data, final=final)
        self.chunks.append(text)
        if self.on_line is None:
            return
        *lines, self.pending = (self.pending + text).split("\n")
        if final and self.pending:
            lines.append(self.pending)
        for line in lines:
            self.on_line(line)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def run_remote(conn: Connection, argv: Sequence[str], *, host: str, stdin: str | None = None, timeout: float | None = None,
               on_stderr_line: Callable[[str], None] | None = None) -> RemoteResult:
    """Run argv on the host; stdin (a secret, say) is written to the process, never to its argv.

    Straight on an SSH channel of the host's one connection, waiting on the channel's readiness: invoke's runner polls
    every running command 100 times a second, which at 32 hosts in flight was most of the controller's CPU.
    """
    command = shlex.join(argv)
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        """Seconds until the deadline (None: no deadline); past it, the timeout error."""
        if deadline is None:
            return None
        if (remaining := deadline - time.monotonic()) > 0:
            return remaining
        raise RemoteTimeoutError(
            f"`{command[:80]}` did not finish within {timeout:g}s (--command-timeout). "
            "It may still be running there; raise the timeout and re-run: the work done so far is kept.",
            host=host, step=shlex.join(argv[:4]),
        )

    out, err = Output(None), Output(on_stderr_line)
    channel = conn.transport.open_session()
    try:
        channel.exec_command(command)
        if stdin is not None:
            with contextlib.suppress(OSError):  # a command that ended without reading it: its exit status says what happened
                channel.sendall(stdin.encode())
        channel.shutdown_write()
        ready = select.poll()  # not select(): a controller holding hundreds of connections has descriptors past FD_SETSIZE
        ready.register(channel.fileno(), select.POLLIN)
        while not _drain(channel, out, err):
            remaining = left()
            ready.poll(None if remaining is None else remaining * 1000)
        out.feed(b"", final=True)
        err.feed(b"", final=True)
        # Output can end before the process does (it closed its stdout and stderr): the exit status is waited for under the same deadline.
        while not channel.status_event.wait(left()):
            pass
        return RemoteResult(channel.recv_exit_status(), out.text, redact(err.text))
    finally:
        channel.close()


def _drain(channel: paramiko.Channel, out: Output, err: Output) -> bool:
    """Take what has arrived; True once the command's output is complete (the host sent EOF, or the connection dropped, and nothing is left)."""
    while channel.recv_ready():
        out.feed(channel.recv(1 << 16))
    while channel.recv_stderr_ready():
        err.feed(channel.recv_stderr(1 << 16))
    return bool(channel.eof_received or channel.closed) and not channel.recv_ready() and not channel.recv_stderr_ready()


def put_file(conn: Connection, local: Path, remote: str) -> None:
    """Upload to a temporary name, then rename: a reader never sees half a file."""
    tmp = f"{remote}.tmp-{os.getpid()}"
    conn.put(str(local), tmp)
    conn.sftp().posix_rename(tmp, remote)
