"""A real Dovecot IMAP server on loopback ports, with a throwaway configuration.

``Dovecot(directory)`` writes a configuration, a password file and a maildir
root under a fresh directory (outside pytest's 0700 tmp tree, so that the mail
user can reach it), and runs ``dovecot -F`` as a child process: IMAP with
STARTTLS on one port, implicit TLS on another, certificates from a test CA.
``user()`` gives each test a login and mailbox of its own; ``client(user)`` is a plain
imaplib connection for looking at what arrived.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import free_port

CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{dir}/cert.pem
ssl_key = <{dir}/key.pem
disable_plaintext_auth = no
mail_location = maildir:{dir}/mail/%u
auth_mechanisms = plain
first_valid_uid = {uid}
default_internal_user = {internal}
default_login_user = {login}
mail_max_userip_connections = 200
namespace inbox {{
  inbox = yes
  separator = /
}}
auth_failure_delay = 0
passdb {{
  driver = static
  args = password=secret
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={dir}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
  process_min_avail = 1
}}
"""


class Dovecot:
    def __init__(self, binary: str, ca: Any) -> None:
        self.binary = binary
        self.ca = ca
        self.dir = Path(tempfile.mkdtemp(prefix="mailflowr-dovecot-"))
        os.chmod(self.dir, 0o755)
        if os.getuid() == 0:  # Dovecot will not deliver as root: use the mail user
            account = pwd.getpwnam("mail")
            self.uid, self.gid = account.pw_uid, account.pw_gid
            internal, login = "dovecot", "dovenull"
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
            internal = login = pwd.getpwuid(self.uid).pw_name
        for sub in ("run", "state", "mail", "home"):
            (self.dir / sub).mkdir()
        for sub in ("mail", "home"):
            os.chown(self.dir / sub, self.uid, self.gid)
        cert = ca.issue_cert("127.0.0.1", "localhost", "imap.customer.test")
        cert.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        self.ca_file = self.dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.port = free_port()
        self.tls_port = free_port()
        (self.dir / "dovecot.conf").write_text(CONFIG.format(
            dir=self.dir, uid=self.uid, gid=self.gid, port=self.port, tls_port=self.tls_port,
            internal=internal, login=login))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Dovecot:
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen(
                [self.binary, "-F", "-c", str(self.dir / "dovecot.conf")],
                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                stderr = (self.dir / "stderr.log").read_text(errors="replace")
                raise AssertionError(f"dovecot exited: {stderr}{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(100).startswith(b"* OK"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"dovecot did not listen:\n{self.log()}")

    def _descendants(self) -> list[int]:
        """Processes the master started (login and imap processes), from /proc."""
        if self.proc is None:
            return []
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        found, frontier = [], [self.proc.pid]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent]
            found += children
            frontier += children
        return found

    def stop(self) -> None:
        """Stop the server, and with it every session (connections drop)."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in self._descendants():  # imap processes outlive the master otherwise
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        path = self.dir / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def user(self) -> str:
        """A new login with a mailbox of its own (every login's password is "secret")."""
        return f"u{uuid.uuid4().hex[:10]}@customer.test"

    def client(self, user: str, password: str = "secret") -> imaplib.IMAP4:
        conn = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        conn.login(user, password)
        return conn

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def fill(self, user: str, folder: str, messages: list[bytes], flags: str = "") -> None:
        """Put messages in a folder by APPEND (as the customer's other clients would)."""
        conn = self.client(user)
        try:
            if folder != "INBOX":
                conn.create(_quote(folder))
            for data in messages:
                typ, _ = conn.append(_quote(folder), f"({flags})" if flags else None, None, data)
                assert typ == "OK"
        finally:
            conn.logout()

    def drop(self, user: str, folder: str, messages: list[bytes]) -> None:
        """Put many messages into a maildir folder at once, as a local delivery agent
        would (files in new/); Dovecot finds them at its next look."""
        conn = self.client(user)  # the folder exists, with its maildir
        try:
            if folder != "INBOX":
                conn.create(_quote(folder))
            assert conn.select(_quote(folder))[0] == "OK"
        finally:
            conn.logout()
        base = self.dir / "mail" / user
        path = base if folder == "INBOX" else base / ("." + folder.replace("/", "."))
        new = path / "new"
        stamp = int(time.time())
        for i, data in enumerate(messages):
            name = new / f"{stamp}.M{i}P{os.getpid()}.test"
            name.write_bytes(data.replace(b"\r\n", b"\n"))
            os.chown(name, self.uid, self.gid)

    def contents(self, user: str, folder: str) -> list[tuple[int, tuple[bytes, ...], bytes]]:
        """(uid, flags, bytes) of every message in a folder, read without changing it."""
        conn = self.client(user)
        try:
            typ, _ = conn.select(_quote(folder), readonly=True)
            if typ != "OK":
                return []
            typ, data = conn.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
            out = []
            for item in data:
                if not isinstance(item, tuple):
                    continue
                head = item[0]
                uid = int(head.split(b"UID ", 1)[1].split()[0])
                flags = tuple(imaplib.ParseFlags(head))
                out.append((uid, flags, item[1]))
            return out
        finally:
            conn.logout()

    def account(self, user: str, tls: str = "none", password_env: str = "MAILFLOWR_TEST_IMAP_PW",
                **extra: Any) -> dict[str, Any]:
        """An imap_accounts entry for the gateway's configuration."""
        port = self.tls_port if tls == "implicit" else self.port
        return {"host": "127.0.0.1", "port": port, "tls": tls, "ca_file": str(self.ca_file),
                "username": user, "password_env": password_env, "timeout": 10, **extra}


def _quote(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
