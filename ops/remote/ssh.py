"""SSH to hosts through Fabric, with known host keys checked: the one place remote commands run."""

from __future__ import annotations

import io
import os
import shlex
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
    client.get_host_keys().clear()
    if opts.known_hosts.exists():
        client.load_host_keys(str(opts.known_hosts))
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
    if opts.host_key_policy == "accept-new":
        opts.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        client.save_host_keys(str(opts.known_hosts))
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


def run_remote(conn: Connection, argv: Sequence[str], *, host: str, stdin: str | None = None, timeout: float | None = None,
               on_stderr_line: Callable[[str], None] | None = None) -> RemoteResult:
    """Run argv on the host; stdin (a secret, say) is written to the process, never to its argv."""
    out, err = _Lines(None), _Lines(on_stderr_line)
    try:
        result = conn.run(shlex.join(argv), hide=True, warn=True, timeout=timeout, in_stream=io.StringIO(stdin) if stdin is not None else False, out_stream=out, err_stream=err)
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
