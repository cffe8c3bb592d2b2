"""Every error bakehouse raises on purpose, each mapped to a documented exit code.

    BakehouseError                      exit 1 unless a subclass says otherwise
    ├── ConfigError (ValueError)        exit 2  bad flags, models.toml, models.lock
    │   ├── ManifestError
    │   ├── LockError
    │   │   └── StaleLockError
    │   └── UnsafePathError
    ├── SourceError (ConnectionError)   exit 3  hub, git or HTTP source failed
    │   ├── SourceUnreachableError
    │   ├── SourceAuthError
    │   ├── SourceNotFoundError
    │   └── OfflineError
    ├── VerificationError               exit 1  files do not match the lock
    ├── DiskSpaceError (OSError)        exit 4  not enough free space
    ├── NotReadyError                   exit 1  a deployed release never answered /ready
    └── DeployLockedError               exit 5  another deploy holds the host's deploy lock

Messages say what is wrong, then what to do next. They never carry a token:
anything that may hold credentials goes through `redact` first.
"""

from __future__ import annotations

import re

EXIT_VERIFY = 1
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_DISK = 4
EXIT_LOCKED = 5


class BakehouseError(Exception):
    exit_code = EXIT_VERIFY


class ConfigError(BakehouseError, ValueError):
    exit_code = EXIT_USAGE


class ManifestError(ConfigError):
    """models.toml cannot be read or holds an invalid value."""


class LockError(ConfigError):
    """models.lock is missing, malformed, or lacks a requested model."""


class StaleLockError(LockError):
    """models.lock was resolved from a different models.toml entry."""


class UnsafePathError(ConfigError):
    """A file path would land outside its model directory."""


class SourceError(BakehouseError, ConnectionError):
    exit_code = EXIT_SOURCE


class SourceUnreachableError(SourceError):
    """The hub, git remote or HTTP server could not be reached."""


class SourceAuthError(SourceError):
    """The source refused our credentials (401/403)."""


class SourceNotFoundError(SourceError):
    """The repository, revision or file does not exist at the source."""


class OfflineError(SourceError):
    """A download was needed while HF_HUB_OFFLINE is set."""


class VerificationError(BakehouseError):
    exit_code = EXIT_VERIFY


class DiskSpaceError(BakehouseError, OSError):
    exit_code = EXIT_DISK


class NotReadyError(BakehouseError):
    exit_code = EXIT_VERIFY


class DeployLockedError(BakehouseError):
    exit_code = EXIT_LOCKED


def error_for_exit(code: int, message: str) -> BakehouseError:
    """Rebuild the error behind a reported exit code (an Outcome carries the code, not the exception)."""
    cls = {EXIT_USAGE: ConfigError, EXIT_SOURCE: SourceError, EXIT_DISK: DiskSpaceError}.get(code, VerificationError)
    return cls(message)


_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_BEARER = re.compile(r"(hf_[A-Za-z0-9]{6,}|Bearer\s+\S+)")


def redact(text: str) -> str:
    """Strip credentials from URLs and token-looking strings before they are shown."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _BEARER.sub("***", text)
