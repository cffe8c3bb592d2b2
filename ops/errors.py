"""Every error bakehouse raises on purpose, each mapped to a documented exit code.

    BakehouseError                      exit 1 unless a subclass says otherwise
    ├── ConfigError (ValueError)        exit 2  bad flags, settings, models.toml, models.lock, inventory
    │   ├── ManifestError
    │   ├── LockError
    │   │   └── StaleLockError
    │   ├── UnsafePathError
    │   └── HostKeyError                        a host's SSH key is unknown or changed
    ├── SourceError (ConnectionError)   exit 3  hub, git or HTTP source failed
    │   ├── SourceUnreachableError
    │   ├── SourceAuthError
    │   ├── SourceNotFoundError
    │   ├── SourceRefusedError                  a 4xx other than 401/403/404/429
    │   ├── PeerError (SourceUnreachableError)  a peer did not give a file (another peer or the origin will)
    │   └── OfflineError
    ├── RemoteError                     exit 3  a host could not be reached or a step on it failed
    │   ├── HostUnreachableError
    │   ├── HostAuthError
    │   ├── RemoteTimeoutError
    │   ├── StepFailedError
    │   └── NoReportError           exit 1  a host's model command ended without its report
    ├── CommandError                    exit 1  a local command (git, podman, docker, pip) failed
    │   └── ImageError                          a build or push failed
    ├── VerificationError               exit 1  files do not match the lock
    │   └── PlantedLinkError                    a symlink in the store that bakehouse did not make
    ├── DiskSpaceError (OSError)        exit 4  not enough free space
    ├── NotReadyError                   exit 1  a deployed release never answered /ready
    ├── DeployLockedError               exit 5  another deploy holds the host's deploy lock
    ├── NotServableError                exit 1  the app's store holds nothing its engine may load
    ├── QueueFullError                          the app has more sequences waiting than it accepts
    ├── ApiError                                an HTTP request the app refuses (status, OpenAI error body)
    └── SamplingError (ValueError)              one row's sampling settings left no valid distribution (the row ends alone)

    Cancelled (Exception)                       control flow, not a failure: a fetch worker stops because
                                                another failed or the user pressed Ctrl-C
    RangesNotSupported (Exception)              control flow: a server ignored Range; the sequential download takes over

The exit code comes from the class, never from a number carried alongside.
Each error carries its data (`details()`), which `--json` reports; across a
process boundary (a host's JSON report) `rebuild` turns the report back into
the same class. Messages say what is wrong, then what to do next. They never
carry a secret: anything that may hold credentials goes through `redact` first.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any, ClassVar

EXIT_OK = 0
EXIT_VERIFY = 1
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_DISK = 4
EXIT_LOCKED = 5
EXIT_INTERRUPTED = 130


class BakehouseError(Exception):
    exit_code: ClassVar[int] = EXIT_VERIFY

    def details(self) -> dict[str, Any]:
        """The data this error carries, JSON-ready (never a secret)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "message": str(self), "exit_code": self.exit_code, **self.details()}


class ConfigError(BakehouseError, ValueError):
    exit_code = EXIT_USAGE


class ManifestError(ConfigError):
    """models.toml cannot be read or holds an invalid value."""


class LockError(ConfigError):
    """models.lock is missing, malformed, or lacks a requested model."""


class StaleLockError(LockError):
    """models.lock was resolved from a different models.toml entry."""


class UnsafePathError(ConfigError):
    """A path would land outside its directory, or is not what bakehouse made (a planted link)."""


class HostKeyError(ConfigError):
    """The host's key is unknown (strict policy) or does not match known_hosts."""

    def __init__(self, message: str, *, host: str = "") -> None:
        super().__init__(message)
        self.host = host

    def details(self) -> dict[str, Any]:
        return {"host": self.host}


class SourceError(BakehouseError, ConnectionError):
    exit_code = EXIT_SOURCE


class SourceUnreachableError(SourceError):
    """The hub, git remote or HTTP server could not be reached."""


class SourceAuthError(SourceError):
    """The source refused our credentials (401/403)."""


class SourceNotFoundError(SourceError):
    """The repository, revision or file does not exist at the source."""


class SourceRefusedError(SourceError):
    """The source refused the request for a reason retrying will not fix (a 4xx)."""


class PeerError(SourceUnreachableError):
    """A peer did not give a file (down, silent, an unexpected answer or range): the file is taken from another peer or the origin."""

    def __init__(self, message: str, *, peer: str = "", path: str = "", why: str = "") -> None:
        super().__init__(message)
        self.peer, self.path, self.why = peer, path, why

    @classmethod
    def of(cls, peer: str, path: str, why: str) -> PeerError:
        return cls(f"peer {peer}: {path}: {why}. Another peer or the origin gives it; completed bytes are kept.", peer=peer, path=path, why=why)

    def details(self) -> dict[str, Any]:
        return {"peer": self.peer, "path": self.path, "why": self.why}


class OfflineError(SourceError):
    """A download was needed while HF_HUB_OFFLINE is set."""


class RemoteError(BakehouseError):
    """Something on a host failed: which host, and at which step."""

    exit_code = EXIT_SOURCE

    def __init__(self, message: str, *, host: str = "", step: str = "") -> None:
        super().__init__(message)
        self.host, self.step = host, step

    def details(self) -> dict[str, Any]:
        return {"host": self.host, "step": self.step}


class HostUnreachableError(RemoteError):
    """No SSH connection could be made (down, wrong address, firewall)."""


class HostAuthError(RemoteError):
    """sshd refused our key or user."""


class RemoteTimeoutError(RemoteError):
    """A remote command ran past --command-timeout."""


class StepFailedError(RemoteError):
    """A command that had to succeed on the host exited non-zero."""


class NoReportError(RemoteError):
    """A host's model command ended without printing its JSON report (it crashed); its last error line is the message."""

    exit_code = EXIT_VERIFY


class CommandError(BakehouseError):
    """A local command failed; its argv and stderr are kept (redacted in the message)."""

    def __init__(self, message: str, *, argv: Sequence[str] = (), returncode: int = 0, stderr: str = "") -> None:
        super().__init__(message)
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr

    @classmethod
    def of(cls, argv: Sequence[str], returncode: int, stderr: str) -> CommandError:
        return cls(f"`{redact(' '.join(argv))}` exited {returncode}: {redact(stderr.strip())[-2000:]}", argv=argv, returncode=returncode, stderr=stderr)

    def details(self) -> dict[str, Any]:
        return {"command": redact(" ".join(self.argv)), "returncode": self.returncode}


class ImageError(CommandError):
    """A build or push command failed."""


class VerificationError(BakehouseError):
    exit_code = EXIT_VERIFY

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)

    def details(self) -> dict[str, Any]:
        return {"problems": list(self.problems)}


class BadPieceError(VerificationError):
    """One piece's bytes are not the ones the lock pins: only that piece is taken again, from another source."""

    def __init__(self, path: str, index: int, *, source: str = "") -> None:
        frm = f" from {source}" if source else ""
        super().__init__(f"{path}: piece {index}{frm} does not match the sha256 models.lock pins for it. It is taken again from another source; "
                         "nothing unverified is passed on or activated.", problems=[f"{path}: piece {index}"])
        self.path, self.index, self.source = path, index, source

    def details(self) -> dict[str, object]:
        return {"path": self.path, "index": self.index, "source": self.source}


class PlantedLinkError(VerificationError):
    """A symlink where the store holds only real files and directories: reported by path, never followed."""

    def __init__(self, message: str, *, paths: Sequence[str] = ()) -> None:
        super().__init__(message, problems=[f"{p}: is a symlink bakehouse did not make; remove the link itself, then re-run" for p in paths])
        self.paths = tuple(paths)

    @classmethod
    def at(cls, *paths: object) -> PlantedLinkError:
        where = ", ".join(str(p) for p in paths)
        return cls(f"{where}: is a symlink where the store holds only real files and directories; bakehouse never follows it. "
                   f"Remove the link itself (`rm {str(paths[0])!r}`, not rm -r on its target) and re-run.", paths=[str(p) for p in paths])

    def details(self) -> dict[str, Any]:
        return {"paths": list(self.paths)}


class DiskSpaceError(BakehouseError, OSError):
    exit_code = EXIT_DISK

    def __init__(self, message: str, *, need: int | None = None, have: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.need, self.have, self.path = need, have, path

    def details(self) -> dict[str, Any]:
        return {"need": self.need, "have": self.have, "path": self.path}


class NotReadyError(BakehouseError):
    exit_code = EXIT_VERIFY

    def __init__(self, message: str, *, host: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.host, self.reason = host, reason

    def details(self) -> dict[str, Any]:
        return {"host": self.host, "reason": self.reason}


class DeployLockedError(BakehouseError):
    exit_code = EXIT_LOCKED

    def __init__(self, message: str, *, host: str = "", owner: str = "") -> None:
        super().__init__(message)
        self.host, self.owner = host, owner

    def details(self) -> dict[str, Any]:
        return {"host": self.host, "owner": self.owner}


class NotServableError(BakehouseError):
    """The store holds nothing this engine may load; the message says why and what to do."""


class QueueFullError(BakehouseError):
    """More sequences are waiting than the server accepts; the client should retry after a moment."""

    def __init__(self, message: str, *, waiting: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.waiting, self.limit = waiting, limit

    def details(self) -> dict[str, Any]:
        return {"waiting": self.waiting, "limit": self.limit}


class ApiError(BakehouseError):
    """A request the API refuses: its HTTP status and what the OpenAI-style error body says (app.server renders it)."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def details(self) -> dict[str, Any]:
        return {"status": self.status, "param": self.param, "code": self.code}


class SamplingError(BakehouseError, ValueError):
    """One row's sampling settings left no valid distribution: that row ends with an error, the batch goes on."""


class Cancelled(Exception):  # noqa: N818 (not an error: the reason a worker stops early)
    """Another worker failed or the user pressed Ctrl-C; stop at the next chunk."""


class RangesNotSupported(Exception):  # noqa: N818 (not a failure: the sequential download takes over)
    """The server answered a Range request with the whole file: the file comes in one stream instead."""


def error_fields(error: BakehouseError | None) -> dict[str, Any]:
    """An error as a report carries it: message, class and data (`details()`), which `rebuild` turns back into the same error."""
    if error is None:
        return {"error": None, "error_type": None}
    return {"error": str(error), "error_type": type(error).__name__, "error_details": error.details()}


def _classes(root: type[BakehouseError] = BakehouseError) -> dict[str, type[BakehouseError]]:
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        found.update(_classes(sub))
    return found


def rebuild(data: dict[str, Any]) -> BakehouseError:
    """The error a report describes (a host's JSON), as the same class with the same data.

    An unknown type (a newer bakehouse on the host) becomes a plain BakehouseError: its message survives.
    """
    cls = _classes().get(str(data.get("type", "")), BakehouseError)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in data.items() if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}
    return cls(str(data.get("message", "")), **kwargs)


_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_BEARER = re.compile(r"(hf_[A-Za-z0-9]{6,}|Bearer\s+\S+)")
_QUERY_SECRET = re.compile(r"([?&;](?:[a-z_]*token|[a-z_]*key|password|passwd|secret|sig|signature|auth|credential)=)[^&#\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Strip credentials from URLs (user:password@, ?token=…) and token-looking strings before they are shown."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _BEARER.sub("***", text)
