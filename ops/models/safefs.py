"""File operations inside the store that never follow a link bakehouse did not make.

Everything under the store root is bakehouse's own: real directories and
files, and one kind of symlink, `<name>/current`. Any other symlink was
planted (or left by another tool); following it could truncate, overwrite or
delete files outside the store. So every create, write, rename and delete
here checks each path component with lstat and opens files with O_NOFOLLOW:
a planted link is reported by path (PlantedLinkError), never followed, and
removing it is left to the person who can tell why it is there. The root
itself (--dest, MODELS_DIR) is the user's choice and may be a link.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

from ops.errors import PlantedLinkError, VerificationError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def _components(root: Path, path: Path) -> list[Path]:
    rel = path.relative_to(root)
    return [root.joinpath(*rel.parts[: i + 1]) for i in range(len(rel.parts))]


def check_no_link(root: Path, path: Path) -> None:
    """Every existing component from below `root` down to `path` is a real directory or file."""
    for part in _components(root, path):
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise PlantedLinkError.at(part)


def makedirs(root: Path, path: Path) -> Path:
    """mkdir -p below `root`, refusing to go through a link (or a file where a directory belongs)."""
    for part in _components(root, path):
        try:
            os.mkdir(part)
            continue
        except FileExistsError:
            pass
        st = os.lstat(part)
        if stat.S_ISLNK(st.st_mode):
            raise PlantedLinkError.at(part)
        if not stat.S_ISDIR(st.st_mode):
            raise VerificationError(f"{part}: a file where the store keeps a directory. Remove it and re-run.", problems=[f"{part}: not a directory"])
    return path


def open_file(root: Path, path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open for a file in the store: its directories are created and checked, the file itself is never a link."""
    makedirs(root, path.parent)
    try:
        return os.open(path, flags | _NOFOLLOW, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PlantedLinkError.at(path) from exc
        raise


def write_file(root: Path, path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, then rename over it: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove(root, tmp)
    fd = open_file(root, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove(root: Path, path: Path) -> None:
    """Delete a file or a whole directory in the store; a link is refused, a missing path is fine."""
    check_no_link(root, path.parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise PlantedLinkError.at(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # fd-based on Linux: never follows a link inside the tree
    else:
        os.unlink(path)


def links_under(path: Path, *, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every symlink at or below `path` (not descending into any), except top-level names in `skip`."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return [path]
    except FileNotFoundError:
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*dirnames, *filenames]:
            full = Path(dirpath, name)
            if (Path(dirpath) != path or name not in skip) and os.path.islink(full):
                found.append(full)
    return found
