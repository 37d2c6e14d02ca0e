"""The privacy key: a secret of the gateway's own, kept outside the database.

It keys two things that must not be recomputable by someone who can only
read or write the database:

- the audit chain: each event's hash is an HMAC over the event and the hash of
  the one before, so an edited or removed event cannot be papered over by
  recomputing the hashes after it;
- the addresses named in audit events (``erase`` records whose mail it removed
  as a keyed hash, never the address itself), so the audit log does not become
  a list of the people who asked to be forgotten, while ``audit list
  --subject ADDRESS`` can still answer "was X erased, and when".

The file holds 32 random bytes (hex) and is made, mode 0600, the first time
the daemon or a command needs it.  Several instances on one database must
share the same file, like the SRS secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from gateway import files
from gateway.keyfiles import KeyFileError, read_secret


@dataclass(frozen=True)
class PrivacyKey:
    secret: bytes

    def __repr__(self) -> str:  # never in a log or traceback
        return "PrivacyKey(...)"

    def _derive(self, purpose: str) -> bytes:
        return hmac.new(self.secret, purpose.encode(), hashlib.sha256).digest()

    @property
    def chain(self) -> bytes:
        """The key of the audit chain's HMACs."""
        return self._derive("mailflowr audit chain v1")

    def subject_hash(self, address: str) -> str:
        """The keyed hash an audit event names a data subject by (case-insensitive)."""
        return hmac.new(self._derive("mailflowr subject v1"),
                        address.strip().lower().encode("utf-8", "surrogateescape"),
                        hashlib.sha256).hexdigest()


def load_or_create(path: Path) -> PrivacyKey:
    """The key in ``path``, made first if there is no file yet.

    KeyFileError when the file is readable by others, unreadable or not a key.
    """
    if not path.exists():
        _create(path)
    text = read_secret(path).strip()
    try:
        secret = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"{path}: not a privacy key (64 hex digits expected)") from None
    if len(secret) < 16:
        raise KeyFileError(f"{path}: the privacy key is shorter than 16 bytes")
    return PrivacyKey(secret)


def _create(path: Path) -> None:
    """Write a new key beside ``path`` and link it into place: a process that finds
    the file finds it whole, and of two processes making it at once one wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        files.make_folders(path.parent)
        with os.fdopen(files.create(tmp), "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it meanwhile: theirs is used
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot create the privacy key: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
