"""SSH to hosts through Fabric, with known host keys checked: the one place remote commands run."""

from __future__ import annotations

import io
import os
import shlex
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut

from ops.errors import HostAuthError, HostKeyError, HostUnreachableError, RemoteTimeoutError, redact
from ops.remote.inventory import Host
from ops.settings import choice

HostKeyPolicy = Literal["strict", "accept-new"]
HOST_KEY_POLICIES: tuple[HostKeyPolicy, ...] = ("strict", "accept-new")


@dataclass(frozen=True)
class SshOptions:
    known_hosts: Path = Path("~/.ssh/known_hosts").expanduser()
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


_KNOWN_HOSTS: dict[Path, tuple[int, paramiko.HostKeys]] = {}
_KNOWN_HOSTS_LOCK = threading.Lock()


def known_hosts(path: Path) -> paramiko.HostKeys:
    """known_hosts parsed once per process (again when the file changes): paramiko's parse is quadratic in the file's lines,
    and parsing it for every host made the controller's CPU per host grow with the fleet."""
    with _KNOWN_HOSTS_LOCK:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return paramiko.HostKeys()
        cached = _KNOWN_HOSTS.get(path)
        if cached is None or cached[0] != mtime:
            cached = _KNOWN_HOSTS[path] = (mtime, paramiko.HostKeys(str(path)))
        return cached[1]


def host_key_name(host: Host) -> str:
    """How known_hosts names the host (as OpenSSH and paramiko do): the address, with the port when it is not 22."""
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def _remember(path: Path, name: str, keys: paramiko.HostKeys) -> None:
    """accept-new: append this host's first-contact key (under a lock: hosts connect in parallel, and a rewrite of the whole file lost keys)."""
    entries = keys.lookup(name) or {}
    with _KNOWN_HOSTS_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.writelines(f"{name} {keytype} {key.get_base64()}\n" for keytype, key in entries.items())
        _KNOWN_HOSTS.pop(path, None)


def connect(host: Host, opts: SshOptions) -> Connection:
    """Open an SSH connection whose host key is checked against known_hosts."""
    key = os.path.expanduser(host.key_file) if host.key_file else None
    conn = Connection(
        host.address,
        user=host.user,
        port=host.port,
        connect_timeout=opts.connect_timeout,
        connect_kwargs={"key_filename": [key] if key else None, "look_for_keys": key is None, "allow_agent": key is None},
    )
    client = conn.client
    name = host_key_name(host)
    known = known_hosts(opts.known_hosts).lookup(name) or {}
    client.get_host_keys().clear()  # only this host's entries: the client looks its key up in them
    for keytype, key in known.items():
        client.get_host_keys().add(name, keytype, key)
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if opts.host_key_policy == "accept-new" else paramiko.RejectPolicy())
    where = f"{host.address}:{host.port}"
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(f"{host.name}: the host key does not match {opts.known_hosts}. If the host was rebuilt, remove its old key (ssh-keygen -R); "
                           "otherwise stop: this may not be your host.", host=host.name) from exc
    except paramiko.AuthenticationException as exc:
        raise HostAuthError(f"{host.name}: SSH authentication refused for {host.user}@{where}. Check ansible_user and ansible_ssh_private_key_file.",
                            host=host.name, step="connect") from exc
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(f"{host.name}: unknown host key ({where} is not in {opts.known_hosts}). Add it (ssh-keyscan) or pass --host-keys accept-new for first contact.",
                               host=host.name) from exc
        raise HostUnreachableError(f"{host.name}: SSH failed ({exc}).", host=host.name, step="connect") from exc
    except OSError as exc:
        raise HostUnreachableError(f"{host.name}: cannot reach {where} ({exc.strerror or exc}). Is the host up and sshd listening?", host=host.name, step="connect") from exc
    if opts.host_key_policy == "accept-new" and not known:
        _remember(opts.known_hosts, name, client.get_host_keys())
    return conn


class _Lines(io.TextIOBase):
    """A stream Fabric writes remote output into: kept whole, and handed on line by line."""

    def __init__(self, on_line: Callable[[str], None] | None):
        self.on_line, self.buffer_, self.text = on_line, "", []

    def write(self, s: str) -> int:
        self.text.append(s)
        self.buffer_ += s
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            if self.on_line:
                self.on_line(line)
        return len(s)


class WholeStdin(io.StringIO):
    """invoke reads an input stream that is not a terminal one character per call, and each one went out as an SSH packet
    of its own (about 100 for a host's settings: the controller's largest CPU cost per host after the host keys): all at once."""

    def read(self, size: int | None = -1) -> str:
        return super().read()


def run_remote(conn: Connection, argv: Sequence[str], *, host: str, stdin: str | None = None, timeout: float | None = None,
               on_stderr_line: Callable[[str], None] | None = None) -> RemoteResult:
    """Run argv on the host; stdin (a secret, say) is written to the process, never to its argv."""
    out, err = _Lines(None), _Lines(on_stderr_line)
    try:
        result = conn.run(shlex.join(argv), hide=True, warn=True, timeout=timeout, in_stream=WholeStdin(stdin) if stdin is not None else False, out_stream=out, err_stream=err)
    except CommandTimedOut as exc:
        raise RemoteTimeoutError(
            f"{host}: `{shlex.join(argv)[:80]}` did not finish within {timeout:g}s (--command-timeout). "
            "It may still be running there; raise the timeout and re-run: the work done so far is kept.",
            host=host, step=shlex.join(argv[:4]),
        ) from exc
    return RemoteResult(result.exited, "".join(out.text), redact("".join(err.text)))


def put_file(conn: Connection, local: Path, remote: str) -> None:
    """Upload to a temporary name, then rename: a reader never sees half a file."""
    tmp = f"{remote}.tmp-{os.getpid()}"
    conn.put(str(local), tmp)
    conn.sftp().posix_rename(tmp, remote)
