"""The `.verified` stamp: proof that a directory matched a lock, and the stat of each file then.

Quick verify trusts a file only while its size, mtime_ns and inode are those
recorded here; anything else is hashed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP_NAME = ".verified"


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


@dataclass(frozen=True)
class StampEntry:
    size: int
    mtime_ns: int
    inode: int
    sha256: str

    @property
    def stat(self) -> FileStat:
        return FileStat(self.size, self.mtime_ns, self.inode)


@dataclass(frozen=True)
class Stamp:
    lock_digest: str
    verified_at: float
    files: dict[str, StampEntry]


def read_stamp(directory: Path) -> Stamp | None:
    try:
        data = json.loads((directory / STAMP_NAME).read_text())
        return Stamp(
            lock_digest=data["lock_digest"],
            verified_at=data["verified_at"],
            files={p: StampEntry(**e) for p, e in data["files"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_stamp(directory: Path, lock_digest: str, hashes: dict[str, str]) -> Stamp:
    """Record each file's current stat with the hash it was verified to have."""
    files = {}
    for path, sha in hashes.items():
        st = FileStat.of(os.lstat(directory / path))
        files[path] = StampEntry(st.size, st.mtime_ns, st.inode, sha)
    stamp = Stamp(lock_digest=lock_digest, verified_at=time.time(), files=files)
    body = {"lock_digest": stamp.lock_digest, "verified_at": stamp.verified_at, "files": {p: asdict(e) for p, e in sorted(files.items())}}
    tmp = directory / f"{STAMP_NAME}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    # O_EXCL|O_NOFOLLOW: a link planted at the temporary name is never written through.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as f:
        f.write(json.dumps(body, indent=1))
    os.replace(tmp, directory / STAMP_NAME)
    return stamp
