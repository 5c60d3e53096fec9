"""Files only the daemon can read: private modes for what gatewayd writes, a check for secrets.

What gatewayd keeps in ``gateway.state_dir`` (queues, sink files, plugin state) holds device
identities (IMEIs), meter data and ESAM records, so it is private to the daemon's user:
directories 0700, files 0600. ``gatewayd run`` and ``demo`` set the process umask to 0077
(``PRIVATE_UMASK``) so that whatever a library creates is private too; the helpers here create
files and directories private even without that umask (gatewayd used as a library, in tests),
and ``tighten`` takes group and others' bits off what an older gatewayd created looser.

Secret files gatewayd reads (``api.token_file``, the ESAM key file) are refused unless their mode
is 0600 or stricter: ``check_private`` is the one check, with the one message, both use.
Symlinks are judged by their target (the mode of a symlink itself means nothing).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "PRIVATE_UMASK",
    "NotPrivateError",
    "check_private",
    "create_private_file",
    "ends_with_newline",
    "fsync_directory",
    "private_dir",
    "private_opener",
    "read_private_text",
    "tighten",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: The daemon's umask: no bits for group or others on anything it (or a library) creates.
PRIVATE_UMASK = 0o077
#: Bits a private file must not have: group, others, and owner execute.
_NOT_PRIVATE_BITS = 0o177


class NotPrivateError(ValueError):
    """A secret file that group or others could read (or that is not a regular file)."""


def check_private(path: str | os.PathLike[str], mode: int) -> None:
    """Refuse a secret file whose ``st_mode`` is not 0600 or stricter (no bits for group or
    others); the message names the file, its mode and the fix."""
    permissions = stat.S_IMODE(mode)
    if permissions & _NOT_PRIVATE_BITS:
        name = os.fspath(path)
        raise NotPrivateError(
            f"{name} has mode {permissions:04o}; it must be 0600 or stricter (chmod 600 {name})"
        )


def read_private_text(path: str | os.PathLike[str]) -> str:
    """The text of a secret file, after ``check_private`` on the file itself (through symlinks).

    Raises OSError (cannot open or read), NotPrivateError (mode, or not a regular file) or
    UnicodeDecodeError. The mode is taken from the open file, so it is the file that is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPrivateError(f"{os.fspath(path)} is not a regular file")
        check_private(path, info.st_mode)
        return handle.read().decode("utf-8")


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents with mode 0700 (``Path.mkdir(parents=True)``
    would give the parents 0777 less the umask). An existing directory is left as it is."""
    path = Path(path)
    missing = []
    current = path
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise
    return path


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """An ``opener`` for ``open()``: a file it creates gets mode 0600 (``open(p, "ab",
    opener=private_opener)``); an existing file keeps its mode."""
    return os.open(path, flags | os.O_CLOEXEC, PRIVATE_FILE_MODE)


def create_private_file(path: str | os.PathLike[str]) -> Path:
    """Make sure ``path`` exists, creating it (and missing directories) private if it does not.

    For files another library opens and creates with its own mode: SQLite creates a database
    0644 less the umask, and its ``-wal`` and ``-shm`` files with the database's mode, so a
    database created here first keeps all three private. An existing file is left as it is.
    """
    path = Path(path)
    private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    return path


def tighten(paths: Iterable[Path], *, follow: Iterable[Path] = ()) -> tuple[int, list[str]]:
    """Take group and others' bits off each existing path (0644 → 0600, 0755 → 0700).

    Symlinks are skipped (what they point to is not ours), except the paths also in ``follow``
    (a state directory that is a symlink, as systemd's ``DynamicUser`` makes it). Returns how
    many were changed and a ``path: reason`` line for each that could not be.
    """
    followed = set(follow)
    changed, failed = 0, []
    for path in paths:
        try:
            info = os.stat(path) if path in followed else os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror or exc}")
            continue
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):  # a symlink too
            continue
        mode = stat.S_IMODE(info.st_mode)
        if not mode & 0o077:
            continue
        try:
            os.chmod(path, mode & ~0o077)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror or exc}")
            continue
        changed += 1
    return changed, failed


def ends_with_newline(path: Path) -> bool:
    """True if the (non-empty) file at ``path`` ends in a newline: a line file whose last line
    a crash cut short does not."""
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file's name durable (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
