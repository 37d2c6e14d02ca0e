"""Encryption at rest: per-tenant data keys, wrapped by a master key, kept outside the
database.

Each raw original is sealed with AES-256-GCM under its tenant's data key, with a
fresh 96-bit nonce and the message's id as associated data (a blob moved to
another row does not open).  ``message_blobs.key_id`` names the key; NULL is a
blob stored in clear (before a master key was configured).

The data keys live in the keystore directory, one file per tenant
(``TENANT.json``), each key wrapped with AES-256-GCM under the master key.
They are deliberately not in the database: ``tenant deactivate`` overwrites
and removes the tenant's file, and from then on copies of its mail in database
backups cannot be opened, while every other tenant's still can.  The master
key comes from a file or an environment variable; rotating it re-wraps the
data keys, the mail itself is not touched.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway import files
from gateway.keyfiles import KeyFileError, read_secret

NONCE = 12
_WRAP_AAD = b"mailflowr data key v1 "
_KEY_ID = re.compile(r"^[a-z0-9_-]{1,64}/[0-9a-f]{16}$")


class KeyUnavailable(Exception):
    """A blob's key cannot be had: destroyed (tenant deactivated), or never here."""


def master_id(master: bytes) -> str:
    """A short name for a master key, stored with what it wraps (never the key)."""
    return hashlib.sha256(b"mailflowr master key id " + master).hexdigest()[:16]


def new_master() -> str:
    return secrets.token_hex(32)


class KeyStore:
    def __init__(self, directory: Path, master: bytes) -> None:
        self.directory = directory
        self.master = AESGCM(master)
        self.master_id = master_id(master)
        self._keys: dict[str, AESGCM] = {}  # key id -> unwrapped data key
        self._raw: dict[str, bytes] = {}  # the same keys' bytes, for re-wrapping
        self._current: dict[str, str] = {}  # tenant -> its key id
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KeyStore({self.directory}, master {self.master_id})"

    def _file(self, tenant: str) -> Path:
        return self.directory / f"{tenant}.json"

    # ------------------------------------------------------------ sealing
    def seal(self, tenant: str, message_id: str, data: bytes) -> tuple[str, bytes]:
        """(key id, nonce + ciphertext) of a message's original."""
        key_id = self.current(tenant)
        nonce = os.urandom(NONCE)
        return key_id, nonce + self._keys[key_id].encrypt(nonce, data, message_id.encode())

    def open(self, message_id: str, key_id: str, blob: bytes) -> bytes:
        key = self.key(key_id)
        try:
            return key.decrypt(blob[:NONCE], blob[NONCE:], message_id.encode())
        except InvalidTag:
            raise KeyUnavailable(f"message {message_id}: the original does not open with "
                                 f"key {key_id} (altered, or moved from another row)") from None

    # ------------------------------------------------------------ keys
    def current(self, tenant: str) -> str:
        """The tenant's key id; the key is made the first time it is needed."""
        with self._lock:
            if tenant not in self._current:
                self._load(tenant, create=True)
            return self._current[tenant]

    def key(self, key_id: str) -> AESGCM:
        with self._lock:
            if key_id not in self._keys:
                if not _KEY_ID.match(key_id):
                    raise KeyUnavailable(f"not a key id: {key_id!r}")
                self._load(key_id.split("/", 1)[0], create=False)
            found = self._keys.get(key_id)
        if found is None:
            raise KeyUnavailable(f"key {key_id} is not in {self.directory}: destroyed when "
                                 "its tenant was deactivated, or never copied here")
        return found

    def _load(self, tenant: str, create: bool) -> None:
        path = self._file(tenant)
        if not path.exists():
            if not create:
                return
            self._create(tenant)
        try:
            doc = json.loads(read_secret(path))
        except (KeyFileError, ValueError) as exc:
            raise KeyFileError(f"{path}: not a keystore file ({exc})") from None
        if doc.get("master") != self.master_id:
            raise KeyFileError(f"{path}: wrapped by master key {doc.get('master')}, but the "
                               f"configured master key is {self.master_id}")
        for entry in doc["keys"]:
            key_id = entry["id"]
            try:
                raw = self.master.decrypt(base64.b64decode(entry["nonce"]),
                                          base64.b64decode(entry["wrapped"]),
                                          _WRAP_AAD + key_id.encode())
            except (InvalidTag, ValueError):
                raise KeyFileError(f"{path}: key {key_id} does not unwrap with the master "
                                   "key") from None
            self._keys[key_id] = AESGCM(raw)
            self._raw[key_id] = raw
        self._current[tenant] = doc["keys"][-1]["id"]

    def _wrap(self, key_id: str, raw: bytes) -> dict[str, str]:
        nonce = os.urandom(NONCE)
        return {"id": key_id, "nonce": base64.b64encode(nonce).decode(),
                "wrapped": base64.b64encode(self.master.encrypt(
                    nonce, raw, _WRAP_AAD + key_id.encode())).decode(),
                "created": datetime.now(UTC).isoformat()}

    def _create(self, tenant: str) -> None:
        key_id = f"{tenant}/{secrets.token_hex(8)}"
        doc: dict[str, Any] = {"tenant": tenant, "master": self.master_id,
               "keys": [self._wrap(key_id, AESGCM.generate_key(bit_length=256))]}
        _write_new(self._file(tenant), json.dumps(doc, indent=1).encode())

    def forget(self, tenant: str) -> None:
        """Drop the tenant's keys from memory (its file is gone or going)."""
        with self._lock:
            self._drop(tenant)

    def _drop(self, tenant: str) -> None:
        for key_id in [k for k in self._keys if k.split("/", 1)[0] == tenant]:
            del self._keys[key_id]
            del self._raw[key_id]
        self._current.pop(tenant, None)

    def tenants(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.json"))

    def describe(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for tenant in self.tenants():
            try:
                doc = json.loads(read_secret(self._file(tenant)))
            except (KeyFileError, ValueError) as exc:
                out.append({"tenant": tenant, "problem": str(exc)})
                continue
            out.append({"tenant": tenant, "master": doc.get("master"),
                        "keys": [{"id": k["id"], "created": k["created"]}
                                 for k in doc.get("keys", [])]})
        return out

    def rewrap(self, new_master: bytes, progress: Callable[[int], None] | None = None) -> int:
        """Wrap every tenant's keys under ``new_master`` (each file replaced atomically);
        how many files (``progress`` is told the count after each).  This store keeps
        working until it is opened with the new key."""
        other = KeyStore(self.directory, new_master)
        count = 0
        for tenant in self.tenants():
            self._load(tenant, create=False)
            path = self._file(tenant)
            doc = json.loads(read_secret(path))
            doc["master"] = other.master_id
            doc["keys"] = [{**other._wrap(k["id"], self._raw[k["id"]]), "created": k["created"]}
                           for k in doc["keys"]]
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            _write_file(tmp, json.dumps(doc, indent=1).encode())
            tmp.replace(path)
            count += 1
            if progress is not None:
                progress(count)
        _sync_dir(self.directory)
        return count


def shred(directory: Path, tenant: str) -> bool:
    """Overwrite and remove a tenant's keystore file; True if there was one.  Needs no
    master key: destroying a key must work even where none is configured."""
    path = directory / f"{tenant}.json"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    with open(path, "r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
    path.unlink()
    _sync_dir(directory)
    return True


def _write_file(path: Path, data: bytes) -> None:
    with os.fdopen(files.create(path), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` whole, or leave the one another process made first."""
    files.make_folders(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _write_file(tmp, data)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        _sync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
