"""Pieces: a file's bytes in fixed-size pieces, each pinned by its own sha256 in models.lock (`lock-models --pieces SIZE`).

With pieces, a host checks each piece as it arrives and may pass it on at
once, before the whole file is there (cut-through fan-out between peers): a
bad piece costs one piece, and the source that sent it is named. The file's
own sha256 is still checked at the end, so a lock whose pieces do not add up
to its file is caught there too. Pieces are derived from the bytes the file's
sha256 already pins, so they do not enter the model's digest: a lock that gains
pieces leaves every stored copy up to date.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from ops.errors import BadPieceError, ConfigError

DEFAULT_PIECE = 64 << 20
MIN_PIECE = 64 << 10
MAX_PIECE = 1 << 30
_SIZE = re.compile(r"^([0-9]{1,10})\s*(|B|K|KB|KiB|M|MB|MiB|G|GB|GiB)\Z", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_piece_size(text: str, label: str = "--pieces") -> int:
    """'64MiB', '8M', '1048576' -> bytes; powers of 1024 whatever the suffix's spelling."""
    match = _SIZE.match(text.strip())
    size = int(match.group(1)) * _UNITS[match.group(2).lower()] if match else 0
    if not MIN_PIECE <= size <= MAX_PIECE:
        raise ConfigError(f"{label}: {text!r} is not a piece size from 64KiB to 1GiB (e.g. 64MiB). Pass a size such as --pieces 64MiB.")
    return size


def piece_count(size: int, piece_size: int) -> int:
    return -(-size // piece_size)


def hash_pieces(path: Path, piece_size: int) -> tuple[str, tuple[str, ...]]:
    """The file's sha256 and each piece's, in one read."""
    whole, pieces = hashlib.sha256(), []
    with open(path, "rb", buffering=0) as f:
        while piece := f.read(piece_size):
            whole.update(piece)
            pieces.append(hashlib.sha256(piece).hexdigest())
    return whole.hexdigest(), tuple(pieces)


class PieceCheck:
    """Fed a file's bytes in order; checks each piece as it completes and reports the verified prefix (`on_verified(bytes)`)."""

    def __init__(self, path: str, size: int, piece_size: int, pieces: tuple[str, ...], on_verified: Callable[[int], None] = lambda n: None) -> None:
        self.path, self.size, self.piece_size, self.pieces, self.on_verified = path, size, piece_size, pieces, on_verified
        self.verified = 0  # bytes, a whole number of pieces (or the whole file)
        self._digest = hashlib.sha256()
        self._fill = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.piece_size - self._fill)
            self._digest.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.piece_size or self.verified + self._fill == self.size:
                self._close()

    def _close(self) -> None:
        index = self.verified // self.piece_size
        if index >= len(self.pieces) or self._digest.hexdigest() != self.pieces[index]:
            raise BadPieceError(self.path, index)
        self.verified += self._fill
        self._digest, self._fill = hashlib.sha256(), 0
        self.on_verified(self.verified)

    def reset(self, upto: int) -> None:
        """Back to byte `upto` (a piece boundary at or below what is verified): the bytes after it are written again."""
        self.verified = min(self.verified, upto - upto % self.piece_size)
        self._digest, self._fill = hashlib.sha256(), 0
        self.on_verified(self.verified)


def prefix_bits(verified: int, piece_size: int, count: int) -> str:
    """The pieces record of a file whose first `verified` bytes (whole pieces, or the whole file) are checked: '1' for each piece held."""
    held = min(count, -(-verified // piece_size))
    return "1" * held + "0" * (count - held)


def write_have(root: Path, record: Path, have: str) -> None:
    """Publish which pieces of a file in flight are verified ('1') for this host's peer server: written whole, then renamed."""
    from ops.models import safefs

    safefs.makedirs(root, record.parent)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = safefs.open_file(root, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, have.encode())
    finally:
        os.close(fd)
    os.replace(tmp, record)


def read_have(record: Path, count: int) -> str:
    """What a record says: exactly `count` '0'/'1' characters, or all '0' when it is absent, a link or not one of ours."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return "0" * count
    try:
        text = os.read(fd, count + 1).decode(errors="replace")
    finally:
        os.close(fd)
    return text if len(text) == count and set(text) <= {"0", "1"} else "0" * count
