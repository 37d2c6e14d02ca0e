"""The protocol attacks of THREATS.md, sent as real bytes to the real listener."""

from __future__ import annotations

import importlib.metadata
import re
import resource
import smtplib
import socket
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import RawClient, simple_message, wait_for
from tests.conftest import client_context as _client_context

# protocol attacks: the replies, and what is stored, do not depend on the database
pytestmark = pytest.mark.sqlite_only

# Every non-CRLF "end of data" a smuggler may try, each followed by a second message.
SMUGGLING_ENDINGS = [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
    b"\r\n\x00.\r\n",
]


# Versions with the fixes the protocol defences rely on (docs/security.md, Versions):
# the floors are in pyproject.toml, and what is installed meets them.
FLOORS = {"aiosmtpd": (1, 4, 6), "mail-parser": (4, 8)}


def test_dependencies_with_security_fixes_are_at_their_floors():
    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    floors = {}
    for requirement in declared["project"]["dependencies"]:
        name, _, version = re.split(r"(>=)", requirement.split(";")[0], maxsplit=1)
        floors[name.strip().split("[")[0]] = tuple(int(p) for p in version.split(",")[0].split("."))
    for package, floor in FLOORS.items():
        assert floors[package] >= floor, package
        installed = importlib.metadata.version(package)
        assert tuple(int(p) for p in re.findall(r"\d+", installed)[:len(floor)]) >= floor



@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=repr)
def test_smuggling_never_yields_a_second_message(gateway, ending):
    c = RawClient(gateway.port)
    assert c.start_data().startswith("354")
    smuggled = (
        b"MAIL FROM:<admin@acme.test>\r\nRCPT TO:<billing@acme.test>\r\nDATA\r\n"
        b"From: admin@acme.test\r\nSubject: smuggled\r\n\r\nevil\r\n"
    )
    c.send(b"From: a@sender.test\r\nSubject: carrier\r\n\r\nbody" + ending + smuggled)
    reply = c.command(b".")
    assert reply.startswith("250 2.0.0"), reply
    assert c.command("QUIT").startswith("221")
    rows = gateway.wait_processed(1)
    assert len(rows) == 1, [r["subject"] for r in rows]
    assert rows[0]["subject"] == "carrier"
    assert rows[0]["recipients"] == ["support@acme.test"]
    raw = gateway.store.raw(rows[0]["id"])
    # Whatever the smuggler sent stays inside the one message, and no bare CR/LF is stored.
    assert b"Subject: smuggled" in raw
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")


def test_pregreeting_talk_is_554(make_gateway):
    gw = make_gateway({"smtp": {"greet_pause": "0.5s"}})
    c = RawClient(gw.port)
    c.send(b"EHLO eager.test\r\n")
    assert c.reply().startswith("554 5.5.0")
    assert c.closed()
    patient = RawClient(gw.port)
    assert patient.reply().startswith("220 ")
    assert patient.command("EHLO patient.test").startswith("250")


def test_starttls(make_gateway, tls_files):
    ca, chain, key = tls_files
    gw = make_gateway({"smtp": {"tls": {"cert_file": str(chain), "key_file": str(key)}}})
    with gw.smtp() as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        assert s.starttls(context=_client_context(ca))[0] == 220
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        s.sendmail("a@sender.test", ["support@acme.test"],
                   b"Subject: secret\r\n\r\nover TLS\r\n")
    row = gw.wait_processed(1)[0]
    assert row["protocol"] == "ESMTPS"
    assert "with ESMTPS id" in row["trace_header"]


def test_starttls_command_injection_is_discarded(make_gateway, tls_files):
    """CVE-2024-34083: commands pipelined after STARTTLS in the clear must not run."""
    ca, chain, key = tls_files
    gw = make_gateway({"smtp": {"tls": {"cert_file": str(chain), "key_file": str(key)}}})
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    plain = sock.makefile("rb")
    assert plain.readline().startswith(b"220 ")
    sock.sendall(b"EHLO client.test\r\n")
    while not plain.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@sender.test>\r\nRCPT TO:<support@acme.test>\r\n")
    assert plain.readline().startswith(b"220 ")
    tls = _client_context(ca).wrap_socket(sock, server_hostname="mx.gateway.test")
    f = tls.makefile("rwb")
    f.write(b"EHLO client.test\r\n")
    f.flush()
    while not f.readline().startswith(b"250 "):
        pass
    # Had the injected MAIL run, this RCPT would be accepted; it must say MAIL is needed.
    f.write(b"RCPT TO:<support@acme.test>\r\n")
    f.flush()
    assert f.readline().startswith(b"503 5.5.1")
    f.close()
    tls.close()
    plain.close()


def test_connection_caps(make_gateway):
    gw = make_gateway({"smtp": {"max_connections_per_ip": 3, "max_connections": 100}})
    held = [RawClient(gw.port) for _ in range(3)]
    for c in held:
        assert c.reply().startswith("220 ")
    extra = RawClient(gw.port)
    assert extra.reply().startswith("421 4.7.0")
    assert extra.closed()
    held.pop().command("QUIT")
    # Once one has gone, a new connection is served again.
    deadline_ok = False
    for _ in range(50):
        c = RawClient(gw.port)
        if c.reply().startswith("220 "):
            deadline_ok = True
            break
    assert deadline_ok


def test_total_connection_cap(make_gateway):
    gw = make_gateway({"smtp": {"max_connections": 2}})
    held = [RawClient(gw.port) for _ in range(2)]
    for c in held:
        assert c.reply().startswith("220 ")
    extra = RawClient(gw.port)
    assert extra.reply().startswith("421 4.7.0")


def test_idle_client_times_out_with_421(make_gateway):
    gw = make_gateway({"smtp": {"idle_timeout": "1s"}})
    c = RawClient(gw.port)
    c.reply()
    c.command("EHLO client.test")
    c.sock.settimeout(10)
    assert c.reply().startswith("421 4.4.2")
    assert c.closed()


def test_idle_timeout_counts_from_the_last_line(make_gateway):
    """A client that talks every 0.6 s outlasts a 1 s idle timeout; once it falls
    silent it gets its 421 about a second after its last line, not before."""
    gw = make_gateway({"smtp": {"idle_timeout": "1s"}})
    c = RawClient(gw.port)
    c.reply()
    assert c.command("EHLO client.test").startswith("250")
    for _ in range(5):  # 3 s in all, three times the timeout
        time.sleep(0.6)
        assert c.command("NOOP").startswith("250 ")
    last = time.monotonic()
    c.sock.settimeout(10)
    assert c.reply().startswith("421 4.4.2")
    assert 0.9 <= time.monotonic() - last < 3
    assert c.closed()


@pytest.mark.sqlite_only
def test_two_thousand_idle_connections(make_gateway, backend):
    """2,000 idle sessions from 40 addresses: all greeted, the next one refused by the
    total cap, every one closed with 421 at the idle timeout, descriptors given back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4500:
        pytest.skip(f"the open files hard limit ({hard}) is below the 4,500 this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4500), hard))
    gw = make_gateway({"smtp": {"max_connections": 2000, "max_connections_per_ip": 50,
                                "idle_timeout": "10s"}})
    fds = Path(f"/proc/{gw.proc.pid}/fd")
    baseline = len(list(fds.iterdir()))
    held: list[socket.socket] = []
    try:
        for n in range(2000):
            s = socket.socket()
            s.settimeout(10)
            s.bind((f"127.0.1.{n // 50 + 1}", 0))
            s.connect(("127.0.0.1", gw.port))
            held.append(s)
        assert all(s.recv(200).startswith(b"220 ") for s in held)
        extra = RawClient(gw.port)
        assert extra.reply().startswith("421 4.7.0")
        assert extra.closed()
        limit = int(next(line.split()[3] for line in
                         Path(f"/proc/{gw.proc.pid}/limits").read_text().splitlines()
                         if line.startswith("Max open files")))
        assert 2000 <= len(list(fds.iterdir())) < limit
        for s in held:  # each gets its 421 at the idle timeout and is closed
            s.settimeout(30)
            assert s.recv(200).startswith(b"421 4.4.2")
            assert s.recv(200) == b""
    finally:
        for s in held:
            s.close()
    wait_for(lambda: len(list(fds.iterdir())) <= baseline + 5, timeout=10,
             what="descriptors given back")
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as client:
        client.sendmail("a@sender.test", ["support@acme.test"], simple_message())
    assert len(gw.messages()) == 1


def test_one_session_cannot_raise_another_sessions_command_limit(gateway):
    """aiosmtpd keeps command limits in one dict for all sessions and EHLO raises the
    MAIL limit in it; here each session has its own."""
    other = RawClient(gateway.port)
    other.reply()
    assert other.command("EHLO other.test").startswith("250")
    noisy = RawClient(gateway.port)
    noisy.reply()
    for _ in range(20):
        assert noisy.command("EHLO noisy.test").startswith("250")
    long_mail = "MAIL FROM:<" + "a" * 850 + "@sender.test>"
    assert other.command(long_mail).startswith("500 5.5.2 Error: command line too long")
