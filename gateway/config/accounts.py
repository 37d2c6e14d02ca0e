"""What gateway.yaml says of each tenant: domains, addresses, users, IMAP accounts,
keep-original and IMAP pull."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from gateway.config.values import (
    HOSTNAME,
    LOCAL_PART,
    TENANT_ID,
    Duration,
    HostName,
    OptionalConfigPath,
    Section,
)
from gateway.keyfiles import KeyFileError, read_secret
from gateway.passwords import is_hash

_FLAG = re.compile(r"^\\?[A-Za-z0-9$_.\-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def imap_folder(value: str) -> str:
    """A folder name as written in the configuration: anything printable, no CR, LF or
    NUL (those would end the IMAP command it is sent in)."""
    if not value or len(value) > 255 or any(c in value for c in "\r\n\x00"):
        raise ValueError(f"not a folder name (1-255 characters, no CR, LF or NUL): {value!r}")
    return value


Folder = Annotated[str, AfterValidator(imap_folder)]


class ImapAccountConfig(Section):
    """A login on a customer's IMAP server (for keep_original and imap_pull)."""

    host: HostName
    # Default: 993 with tls: implicit, 143 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    # implicit: TLS from the start (993); starttls: required on the plain port; none:
    # plain text (loopback or a private network only).
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    # CA certificates to trust (PEM); empty: the system's.
    ca_file: OptionalConfigPath = None
    # Check the server's certificate and name (turn off only for a test server).
    verify: bool = True
    username: str
    # The password: a file (mode 0600 or 0640), or an environment variable (set for
    # example by systemd's EnvironmentFile=).  Never inline.
    password_file: OptionalConfigPath = None
    password_env: str | None = None
    # Seconds to wait for the server's answer to one command.
    timeout: Duration = 60.0
    # Connections kept open at most for appending originals.
    connections: int = Field(default=4, ge=1, le=50)


    @field_validator("username")
    @classmethod
    def _username(cls, v: str) -> str:
        if not v or any(c in v for c in "\r\n\x00"):
            raise ValueError("a user name has no CR, LF or NUL")
        return v

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"not an environment variable name: {v!r}")
        return v

    @model_validator(mode="after")
    def _one_password(self) -> ImapAccountConfig:
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("give exactly one of password_file and password_env")
        if self.password_file is not None:

            try:
                read_secret(self.password_file)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"{self.ca_file}: no such file")
        return self

    @property
    def server_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    def password(self, env: Mapping[str, str] | None = None) -> str:
        """The password now (a rotated file or a changed environment is read anew);
        ValueError saying what is missing."""
        if self.password_file is not None:

            try:
                data = read_secret(self.password_file)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
            return data.decode("utf-8").rstrip("\r\n")
        assert self.password_env is not None
        value = (os.environ if env is None else env).get(self.password_env)
        if not value:
            raise ValueError(f"environment variable {self.password_env} is not set")
        return value


class KeepOriginalConfig(Section):
    """Keep the untouched original of each inbound message on the tenant's own server."""

    # An imap_accounts entry: the original is appended to folder (IMAP APPEND) ...
    imap: str | None = None
    folder: Folder = "INBOX"
    # Flags the kept original gets, e.g. ["\\Seen"].
    flags: list[str] = []
    # Create folder when it does not exist.
    create_folder: bool = True
    # ... or a destinations entry: the original is relayed there by SMTP, to its
    # envelope recipients.
    destination: str | None = None
    # true: every inbound message; false: only those a workflow rule keeps
    # (action keep_original: true).
    all_mail: bool = True

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not _FLAG.match(flag) or flag.lower() == "\\recent":
                raise ValueError(f"not a flag that can be set: {flag!r}")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> KeepOriginalConfig:
        if (self.imap is None) == (self.destination is None):
            raise ValueError("give exactly one of imap (an imap_accounts entry) and "
                             "destination (a destinations entry)")
        return self


class ImapPullConfig(Section):
    """A mailbox the gateway fetches the tenant's mail from."""

    # An imap_accounts entry.
    account: str
    folders: list[Folder] = ["INBOX"]
    # The envelope recipient imported mail is stored with (an address of the tenant):
    # what workflow rules see as the recipient.
    recipient: str
    # Seconds between checks; with IDLE (when the server offers it), new mail is
    # fetched at once and this is the longest wait.
    interval: Duration = 60.0
    idle: bool = True
    # What happens to a message on the server once its import is committed: keep
    # (untouched, not even marked \\Seen), mark_seen, move (to move_to) or delete.
    after_import: Literal["keep", "mark_seen", "move", "delete"] = "keep"
    move_to: Folder | None = None
    # Messages fetched per round trip (and per transaction).
    batch_size: int = Field(default=100, ge=1, le=200)

    @model_validator(mode="after")
    def _move_to(self) -> ImapPullConfig:
        if (self.after_import == "move") != (self.move_to is not None):
            raise ValueError("move_to goes with after_import: move, and only with it")
        if not self.folders:
            raise ValueError("folders: name at least one")
        return self


class UserConfig(Section):
    """An internal user of the submission service."""

    password_hash: str
    # Addresses the user may send as, envelope and header From alike; ``*`` in a local
    # part matches any text (``*@example.test``: the whole domain).  Empty: the user's
    # own login address only.
    send_as: list[str] = []

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, v: str) -> str:

        if not is_hash(v):
            raise ValueError("store a hash, not a password: mailflowr-gateway users hash-password")
        return v


class TenantConfig(Section):
    name: str = ""
    domains: list[str] = Field(min_length=1)
    addresses: list[str] = []
    catch_all: bool = False
    users: dict[str, UserConfig] = {}
    # Mail failing DMARC from a domain that publishes p=reject: tag (accept it; the
    # result is stored, in Authentication-Results, and rules match dmarc: fail) or
    # reject (550 5.7.1 at the end of DATA).
    dmarc: Literal["tag", "reject"] = "tag"
    # The domain of rewritten (SRS) senders of copies forwarded for this tenant: one of
    # its domains; empty: the first.
    srs_domain: str | None = None
    # Keep each inbound original on the tenant's own mail server (see KeepOriginalConfig).
    keep_original: KeepOriginalConfig | None = None
    # Mailboxes to import mail from, by name (see ImapPullConfig).
    imap_pull: dict[str, ImapPullConfig] = {}
    # Index the text of this tenant's mail for full-text search (store/search.py). The
    # index holds that text in clear, also when originals are encrypted at rest.
    search: bool = True

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            d = d.lower().rstrip(".")
            if not HOSTNAME.match(d) or "." not in d:
                raise ValueError(f"not a valid domain: {d!r}")
            out.append(d)
        return out

    @model_validator(mode="after")
    def _addresses(self) -> TenantConfig:
        for a in self.addresses:
            local, at, domain = a.rpartition("@")
            if not at or not LOCAL_PART.match(local) or local.startswith(".") or ".." in local:
                raise ValueError(f"not a plain address: {a!r}")
            if domain.lower() not in self.domains:
                raise ValueError(f"{a!r} is not in one of this tenant's domains")
        if not self.addresses and not self.catch_all:
            raise ValueError("a tenant needs addresses, or catch_all: true")
        for login, user in self.users.items():
            for a in user.send_as:
                local, at, domain = a.rpartition("@")
                if not at or not LOCAL_PART.match(local):
                    raise ValueError(f"user {login}: send_as {a!r} is not an address or "
                                     "a pattern such as *@example.test")
                if domain.lower() not in self.domains:
                    raise ValueError(f"user {login}: send_as {a!r} is not in this tenant's domains")
            if not user.send_as and login.rpartition("@")[2].lower() not in self.domains:
                raise ValueError(f"user {login}: the login is not an address of this tenant's "
                                 "domains, so it may send as nothing: list send_as")
        if self.srs_domain is not None:
            if self.srs_domain.lower().rstrip(".") not in self.domains:
                raise ValueError(f"srs_domain {self.srs_domain!r} is not one of its domains")
        for name, pull in self.imap_pull.items():
            if not TENANT_ID.match(name):
                raise ValueError(f"imap_pull {name!r}: use lower-case letters, digits, - and _")
            if pull.recipient.rpartition("@")[2].lower() not in self.domains:
                raise ValueError(f"imap_pull {name}: recipient {pull.recipient!r} is not in "
                                 "this tenant's domains")
        return self
