"""The copies a relay has taken and the database does not know of yet, on disk at once.

Between a relay's 250 and the commit that records it lies a window of a few
milliseconds (the result waits for the group it is written with); a process
killed inside it leaves the copy leased and pending, and whoever takes the
work over sends it a second time.  Postfix closes most of that window by
marking the recipient done in its queue file as soon as the reply is read;
this journal does the same: each copy taken is one line ("delivery id") appended
to a file of the process's own, with one ``write`` (no fsync: it survives the
death of the process, kill -9 and out-of-memory kills included, not that of the
machine).  A process that starts on the same host records what the journals of
dead processes hold as sent, before their leases are freed, and deletes them.

Files are ``HOST-PID-N.journal`` in ``delivery.journal``; a file is begun
anew every SEGMENT bytes and deleted once every copy it lists is recorded.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SEGMENT = 1 << 20  # bytes in one file before the next is begun
SUFFIX = ".journal"


class Journal:
    """This process's journal: ``sent`` when a relay took a copy, ``recorded`` once
    its result is committed (or no longer this process's to record)."""

    def __init__(self, directory: Path, host: str) -> None:
        self.directory = directory
        self.prefix = f"{host}-{os.getpid()}-"
        self._fd = -1
        self._number = -1  # of the file written to now
        self._size = 0
        self._open: dict[int, int] = {}  # file number -> copies in it not yet recorded
        self._file_of: dict[int, int] = {}  # delivery id -> file number

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._next_file()

    def _path(self, number: int) -> Path:
        return self.directory / f"{self.prefix}{number}{SUFFIX}"

    def _next_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._release(self._number)
        self._number += 1
        self._fd = os.open(self._path(self._number),
                           os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self._size = 0
        self._open[self._number] = 0

    def sent(self, delivery_id: int) -> None:
        """A relay answered 250 for this delivery: on disk before anything else runs."""
        if self._fd < 0:
            return
        line = b"%d\n" % delivery_id
        os.write(self._fd, line)
        self._size += len(line)
        self._file_of[delivery_id] = self._number
        self._open[self._number] += 1
        if self._size >= SEGMENT:
            self._next_file()

    def recorded(self, delivery_ids: Iterable[int]) -> None:
        """These results are committed: the files that list only recorded copies go."""
        for delivery_id in delivery_ids:
            number = self._file_of.pop(delivery_id, None)
            if number is not None:
                self._open[number] -= 1
                if number != self._number:
                    self._release(number)

    def _release(self, number: int) -> None:
        if self._open.get(number) == 0:
            del self._open[number]
            self._path(number).unlink(missing_ok=True)

    def close(self) -> None:
        """At a stop: the files go when every copy they list is recorded."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        for number in list(self._open):
            self._release(number)


def left_behind(directory: Path, host: str, alive: Callable[[int], bool]
                ) -> dict[int, tuple[list[int], list[Path]]]:
    """By process id, the copies the journals of this host's dead processes list as
    sent, and their files.  A line cut short (the machine stopped mid-write) is skipped."""
    found: dict[int, tuple[list[int], list[Path]]] = {}
    if not directory.is_dir():
        return found
    name = re.compile(rf"{re.escape(host)}-(\d+)-\d+{re.escape(SUFFIX)}")
    for path in sorted(directory.iterdir()):
        match = name.fullmatch(path.name)
        if match is None or alive(int(match[1])):
            continue
        ids, paths = found.setdefault(int(match[1]), ([], []))
        paths.append(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("delivery: cannot read the journal %s: %s", path, exc)
            continue
        ids.extend(int(line) for line in data.split(b"\n")[:-1] if line.isdigit())
    return found
