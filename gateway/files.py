"""Files and folders the gateway makes: its own user's alone, whatever the umask.

What the gateway writes holds personal data or secrets (the database, keys, message
exports, export archives), so each file is created 0600 and each folder 0700 where it
is made, not left to the process umask: the systemd unit's ``UMask=0077`` covers a
service start, not a daemon or command started by hand under the usual 022.  No
process-wide umask is set on top: with one, a creation site that forgot these
helpers would go unnoticed by the tests that run the gateway under 022.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def create(path: Path | str, flags: int = os.O_WRONLY | os.O_TRUNC) -> int:
    """Open ``path`` for writing, created 0600 if it is not there (O_CREAT is added):
    a file descriptor.  The mode is set again on the open file because the umask
    applies to os.open's mode (a umask that takes the owner's bits would leave it
    less than 0600)."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_folders(path: Path) -> None:
    """``path`` and every missing folder above it, each made 0700 (``mkdir -p`` and
    Path.mkdir(parents=True) make the parents with the umask's mode); folders that
    are there already are left as they are."""
    missing: list[Path] = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(FOLDER_MODE)
        except FileExistsError:
            if folder.is_dir():  # another process made it meanwhile
                continue
            raise
        os.chmod(folder, FOLDER_MODE)
