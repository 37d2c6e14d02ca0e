"""Acceptance and storage through the real daemon, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import smtplib
import threading
from datetime import UTC, datetime

import pytest

from tests.conftest import RawClient, simple_message


def test_accepts_stores_and_processes_a_message(gateway):
    raw = simple_message(subject="Invoice 42", body="Line one.\r\n.leading dot\r\n")
    with gateway.smtp() as s:
        code, _ = s.ehlo("client.sender.test")
        assert code == 250
        refused = s.sendmail("alice@sender.test", ["support@acme.test", "billing@acme.test"], raw)
        assert refused == {}
    rows = gateway.wait_processed(1)
    assert len(rows) == 1
    row = rows[0]
    assert row["tenant_id"] == "acme"
    assert row["status"] == "processed"
    assert row["mail_from"] == "alice@sender.test"
    assert row["recipients"] == ["support@acme.test", "billing@acme.test"]
    assert row["subject"] == "Invoice 42"
    assert row["header_from"] == "Alice <alice@sender.test>"
    assert row["message_id"].endswith("@sender.test>")
    assert row["size"] == len(raw)
    # The original is kept byte for byte (dot-stuffing undone); our trace header apart.
    assert gateway.store.raw(row["id"]) == raw
    assert row["trace_header"].startswith("Received: from client.sender.test ([127.0.0.1])")
    assert f"id {row['id']}" in row["trace_header"]
    addresses = gateway.store.get_message(row["id"])["addresses"]
    assert ("from", "alice@sender.test") in addresses
    assert ("to", "support@acme.test") in addresses


@pytest.mark.sqlite_only
def test_reply_names_the_queue_id(gateway):
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        s.rcpt("support@acme.test")
        code, text = s.data(simple_message())
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: queued as ")
    queue_id = text.split()[-1].decode()
    assert [r["id"] for r in gateway.messages()] == [queue_id]


@pytest.mark.sqlite_only
def test_unknown_recipient_of_a_tenant_domain_is_550(gateway):
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        code, text = s.rcpt("nobody@acme.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert s.rcpt("support+tickets@acme.test")[0] == 250  # recipient delimiter
        assert s.rcpt("SUPPORT@ACME.TEST")[0] == 250  # case does not matter
        assert s.rcpt("anyone@globex.test")[0] == 250  # catch-all tenant


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "address",
    [
        "victim@elsewhere.test",
        "victim%elsewhere.test@acme.test",
        '"victim@elsewhere.test"@acme.test',
        "elsewhere.test!victim@acme.test",
        "elsewhere.test!victim",
        "victim@[192.0.2.1]",
        "victim@acme.test.elsewhere.test",
        "victim@ACME.TEST.ELSEWHERE.TEST",
        "victim",
    ],
)
def test_relay_tricks_are_refused(gateway, address):
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        code, text = s.rcpt(address)
    assert code == 554, (address, code, text)
    assert b"5.7.1" in text and b"Relay access denied" in text
    assert gateway.messages() == []


@pytest.mark.sqlite_only
def test_a_trailing_dot_is_refused_as_a_malformed_address(gateway):
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        for address in ("victim@elsewhere.test.", "victim@Elsewhere.TEST.", "support@acme.test."):
            code, text = s.rcpt(address)
            assert (code, text[:5]) == (553, b"5.1.3"), (address, text)
    assert gateway.messages() == []


@pytest.mark.sqlite_only
def test_source_route_is_refused(gateway):
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    assert c.command("MAIL FROM:<a@sender.test>").startswith("250")
    reply = c.command("RCPT TO:<@elsewhere.test:victim@acme.test>")
    assert reply.startswith("554 5.7.1"), reply
    c.close()


def test_null_sender_is_accepted(gateway):
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO bounce.test")
    assert c.command("MAIL FROM:<>").startswith("250 2.1.0")
    assert c.command("RCPT TO:<support@acme.test>").startswith("250 2.1.5")
    assert c.command("DATA").startswith("354")
    assert c.command(b"Subject: bounce\r\n\r\nreturned\r\n.").startswith("250 2.0.0")
    c.close()
    assert gateway.wait_processed(1)[0]["mail_from"] == ""


@pytest.mark.sqlite_only
def test_size_limit_at_mail_and_for_an_oversize_stream(gateway):
    c = RawClient(gateway.port)
    c.reply()
    assert "SIZE 200000" in c.command("EHLO client.test")
    assert c.command("MAIL FROM:<a@sender.test> SIZE=300000").startswith("552 5.3.4")
    assert c.command("MAIL FROM:<a@sender.test> SIZE=1000").startswith("250")
    assert c.command("RCPT TO:<support@acme.test>").startswith("250")
    assert c.command("DATA").startswith("354")
    line = b"x" * 70 + b"\r\n"
    for _ in range(4000):  # 288 KB, over the 200 KB limit
        c.send(line)
    assert c.command(b".").startswith("552 5.3.4")
    # The session goes on: the next transaction works.
    assert c.command("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.command("RCPT TO:<support@acme.test>").startswith("250")
    assert c.command("DATA").startswith("354")
    assert c.command(b"Subject: small\r\n\r\nok\r\n.").startswith("250 2.0.0")
    c.close()
    rows = gateway.wait_processed(1)
    assert [r["subject"] for r in rows] == ["small"]


@pytest.mark.sqlite_only
def test_recipient_cap_is_452(gateway):
    with gateway.smtp() as s:
        s.ehlo()
        s.mail("a@sender.test")
        for n in range(5):
            assert s.rcpt(f"user{n}@globex.test")[0] == 250
        code, text = s.rcpt("user5@globex.test")
        assert (code, text[:5]) == (452, b"4.5.3")
        assert s.data(simple_message(to="user0@globex.test"))[0] == 250
    assert len(gateway.wait_processed(1)[0]["recipients"]) == 5


def send_recipients(c: RawClient, count: int) -> list[str]:
    """MAIL, ``count`` RCPTs and DATA pipelined in one write (from a thread, so that the
    replies are read while the commands go out); the replies up to DATA's, or up to the
    one the server closed the connection after."""
    commands = b"MAIL FROM:<a@sender.test>\r\n" + b"".join(
        b"RCPT TO:<u%d@globex.test>\r\n" % n for n in range(count)) + b"DATA\r\n"

    def write() -> None:
        # the server may close the connection after a 421 with commands still unread
        with contextlib.suppress(ConnectionError):
            c.sock.sendall(commands)

    writer = threading.Thread(target=write)
    writer.start()
    replies = []
    try:
        while len(replies) < count + 2:
            replies.append(c.reply())
    except ConnectionError:
        pass
    writer.join(10)
    return replies


@pytest.mark.sqlite_only
def test_recipients_past_the_cap_are_not_errors_within_the_overshoot(make_gateway):
    gateway = make_gateway({"smtp": {"max_recipients": 1000, "recipient_overshoot_limit": 9000}})
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    replies = send_recipients(c, 10_000)
    assert replies[0].startswith("250 2.1.0")
    assert [r[:9] for r in replies[1:-1]] == ["250 2.1.5"] * 1000 + ["452 4.5.3"] * 9000
    assert replies[-1].startswith("354")
    assert c.command(simple_message(to="u0@globex.test") + b".").startswith("250 2.0.0")
    c.close()
    [row] = gateway.messages()
    assert row["recipients"] == [f"u{n}@globex.test" for n in range(1000)]


@pytest.mark.sqlite_only
def test_recipients_past_the_overshoot_count_as_errors(make_gateway):
    gateway = make_gateway({"smtp": {"max_recipients": 1000}})  # overshoot: 1000 by default
    # 1,000 accepted, 1,000 refused and forgiven, 9 refused and counted: one short
    # of smtp.max_errors (10), so DATA still goes through.
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    replies = send_recipients(c, 2009)
    assert [r[:3] for r in replies[1:]] == ["250"] * 1000 + ["452"] * 1009 + ["354"]
    assert c.command(simple_message(to="u0@globex.test") + b".").startswith("250 2.0.0")
    c.close()
    # A client that does not stop is cut off at the tenth counted one. (Exactly up to it:
    # commands still unread in the server's socket when it closes make the kernel reset
    # the connection, and the client may then lose replies that were on their way.)
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    replies = send_recipients(c, 2011)
    assert [r[:3] for r in replies[1:]] == ["250"] * 1000 + ["452"] * 1010 + ["421"]
    assert replies[-1].startswith("421 4.7.0") and "too many errors" in replies[-1]
    assert c.closed()
    [row] = gateway.messages()
    assert len(row["recipients"]) == 1000


def test_recipients_of_two_tenants_are_stored_apart(gateway):
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test", "x@globex.test"], simple_message())
    rows = gateway.wait_processed(2)
    assert sorted((r["tenant_id"], tuple(r["recipients"])) for r in rows) == [
        ("acme", ("support@acme.test",)),
        ("globex", ("x@globex.test",)),
    ]


def test_smtputf8(gateway):
    c = RawClient(gateway.port)
    c.reply()
    assert "SMTPUTF8" in c.command("EHLO client.test")
    # Without declaring SMTPUTF8, a UTF-8 address is refused.
    assert c.command("MAIL FROM:<jos\u00e9@sender.test>".encode()).startswith("553 5.6.7")
    assert c.command("MAIL FROM:<jos\u00e9@sender.test> SMTPUTF8".encode()).startswith("250")
    assert c.command("RCPT TO:<support@acme.test>").startswith("250")
    assert c.command("DATA").startswith("354")
    body = "Subject: caf\u00e9\r\nFrom: jos\u00e9@sender.test\r\n\r\nol\u00e9\r\n".encode()
    assert c.command(body + b".").startswith("250 2.0.0")
    c.close()
    row = gateway.wait_processed(1)[0]
    assert row["mail_from"] == "jos\u00e9@sender.test"
    assert row["smtputf8"] is True
    assert row["protocol"] == "UTF8SMTP"
    assert gateway.store.raw(row["id"]) == body


@pytest.mark.sqlite_only
def test_command_and_text_line_length(gateway):
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    assert c.command("NOOP " + "x" * 600).startswith("500 5.5.2")
    assert c.command("MAIL FROM:<a@sender.test>").startswith("250")
    assert c.command("RCPT TO:<support@acme.test>").startswith("250")
    assert c.command("DATA").startswith("354")
    reply = c.command(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.")
    assert reply.startswith("500 5.5.2") and "1000" in reply
    c.close()
    assert gateway.messages() == []


@pytest.mark.sqlite_only
def test_too_many_errors_closes_with_421(gateway):
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    c.command("MAIL FROM:<a@sender.test>")
    replies = [c.command(f"RCPT TO:<u{n}@elsewhere.test>") for n in range(9)]
    assert all(r.startswith("554 5.7.1") for r in replies)
    assert c.command("RCPT TO:<u9@elsewhere.test>").startswith("554 5.7.1")
    assert c.reply().startswith("421 4.7.0")
    assert c.closed()


@pytest.mark.sqlite_only
def test_unknown_commands_close_with_421(gateway):
    c = RawClient(gateway.port)
    c.reply()
    replies = [c.command(f"BOGUS{n}") for n in range(5)]
    assert replies[0].startswith("502 5.5.2")
    assert replies[-1].startswith("421 4.7.0")
    assert c.closed()


@pytest.mark.sqlite_only
def test_legal_pipelining_works(gateway):
    c = RawClient(gateway.port)
    c.reply()
    assert "PIPELINING" in c.command("EHLO client.test")
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<support@acme.test>\r\n"
           b"RCPT TO:<nobody@acme.test>\r\nDATA\r\n")
    assert [c.reply()[:3] for _ in range(4)] == ["250", "250", "550", "354"]
    c.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nMAIL FROM:<b@sender.test>\r\n"
           b"RCPT TO:<billing@acme.test>\r\nDATA\r\n")
    assert c.reply().startswith("250 2.0.0")
    assert [c.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    assert c.command(b"Subject: second\r\n\r\nbody\r\n.").startswith("250 2.0.0")
    assert c.command("QUIT").startswith("221 2.0.0")
    c.close()
    assert sorted(r["subject"] for r in gateway.wait_processed(2)) == ["piped", "second"]


@pytest.mark.sqlite_only
def test_unauthorised_pipelining_after_ehlo_is_554(gateway):
    c = RawClient(gateway.port)
    c.reply()
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\n")
    assert c.reply().startswith("554 5.5.0")
    assert c.closed()


@pytest.mark.sqlite_only
def test_message_text_before_354_is_554(gateway):
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<support@acme.test>\r\n"
           b"DATA\r\nSubject: eager\r\n\r\nbody\r\n.\r\n")
    replies = [c.reply() for _ in range(3)]
    assert replies[2].startswith("554 5.5.0"), replies
    assert c.closed()
    assert gateway.messages() == []


def test_client_that_drops_mid_data_leaves_nothing(gateway):
    c = RawClient(gateway.port)
    assert c.start_data().startswith("354")
    c.send(b"Subject: half\r\n\r\nonly half of it")
    c.close()
    # A later, complete message goes through; the half one never appears.
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="whole"))
    assert [r["subject"] for r in gateway.wait_processed(1)] == ["whole"]


def test_client_that_drops_right_after_the_dot_leaves_all_or_nothing(gateway):
    for n in range(10):
        c = RawClient(gateway.port)
        assert c.start_data().startswith("354")
        c.send(simple_message(subject=f"drop {n}") + b".\r\n")
        c.close()
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject="after"))
    rows = gateway.wait_processed(1)
    assert "after" in [r["subject"] for r in rows]
    for row in rows:  # every stored row is whole: original present and matching its checksum
        raw = gateway.store.raw(row["id"])
        assert raw is not None and len(raw) == row["size"]
        assert row["recipients"] == ["support@acme.test"]


def test_concurrent_clients(gateway):
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with gateway.smtp() as s:
                for k in range(5):
                    s.sendmail("a@sender.test", [f"user{n}@globex.test"],
                               simple_message(subject=f"c{n}-{k}", to=f"user{n}@globex.test"))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    rows = gateway.wait_processed(100)
    assert sorted(r["subject"] for r in rows) == sorted(
        f"c{n}-{k}" for n in range(20) for k in range(5)
    )


@pytest.mark.sqlite_only
def test_bare_newline_reject_mode(make_gateway):
    gw = make_gateway({"smtp": {"bare_newline": "reject"}})
    c = RawClient(gw.port)
    assert c.start_data().startswith("354")
    assert c.command(b"Subject: x\r\n\r\nbare\nlf\r\n.").startswith("550 5.5.2")
    c.close()
    assert gw.messages() == []


@pytest.mark.sqlite_only
def test_bad_parameters_get_a_clear_reply(gateway):
    """Unsupported parameters: a 5.5.4 reply, no exception text."""
    c = RawClient(gateway.port)
    c.reply()
    c.command("EHLO client.test")
    reply = c.command("MAIL FROM:<a@sender.test> BODY=BINARYMIME")
    assert reply.startswith("501 5.5.4")
    assert "Traceback" not in reply and "Exception" not in reply
    # EHLO's own refusal gets its enhanced code too (its 250 lines stay as they are)
    assert c.command("EHLO").startswith("501 5.5.4 Syntax: EHLO hostname")
    assert c.command("HELO").startswith("501 5.5.4 Syntax: HELO hostname")
    c.close()


def test_cli_lists_shows_and_exports(gateway, tmp_path):
    raw = simple_message(subject="Export me")
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], raw)
        s.sendmail("a@sender.test", ["x@globex.test"], simple_message(subject="other"))
    gateway.wait_processed(2)
    listed = json.loads(gateway.cli("messages", "list", "--json", "--tenant", "acme",
                                    check=True).stdout)
    assert len(listed) == 1
    entry = listed[0]
    assert {"id", "tenant", "message_id", "sender", "recipients", "size", "tags",
            "status"} <= set(entry)
    assert (entry["tenant"], entry["subject"], entry["size"]) == ("acme", "Export me", len(raw))
    shown = json.loads(gateway.cli("messages", "show", entry["id"], "--json", check=True).stdout)
    assert shown["sha256"] and shown["status"] == "processed"
    text = gateway.cli("messages", "list", check=True).stdout.decode()
    assert "Export me" in text and "other" in text
    header, first = text.splitlines()[:2]
    assert header.split()[:3] == ["ID", "RECEIVED", "(UTC)"]
    received = datetime.fromisoformat(entry["received_at"]).astimezone(UTC)
    assert first.split()[1:3] == received.strftime("%Y-%m-%d %H:%M:%S").split()
    exported = gateway.cli("messages", "export", entry["id"], check=True).stdout
    assert exported == raw
    out = tmp_path / "m.eml"
    gateway.cli("messages", "export", entry["id"], "--out", str(out), "--with-trace", check=True)
    assert out.read_bytes().startswith(b"Received: from ")
    assert out.read_bytes().endswith(raw)
    events = gateway.store.audit_events("acme")
    assert [e["action"] for e in events] == ["message.show", "message.export", "message.export"]
    missing = gateway.cli("messages", "show", "01NOSUCHMESSAGE0000000000")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == (
        "mailflowr-gateway: no message with id 01NOSUCHMESSAGE0000000000"
    )


@pytest.mark.sqlite_only
def test_swaks_delivers(gateway):
    import subprocess

    from tests.conftest import need_tool

    result = subprocess.run(
        [need_tool("swaks", "swaks"), "--server", f"127.0.0.1:{gateway.port}",
         "--from", "a@sender.test", "--to", "info@acme-mail.test",
         "--header", "Subject: via swaks", "--silent", "2"],
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["subject"] for r in gateway.wait_processed(1)] == ["via swaks"]


@pytest.mark.sqlite_only
def test_smtplib_sees_enhanced_codes(gateway):
    with gateway.smtp() as s:
        s.ehlo()
        assert s.has_extn("enhancedstatuscodes")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            s.sendmail("a@sender.test", ["x@elsewhere.test"], simple_message())
    code, text = info.value.recipients["x@elsewhere.test"]
    assert code == 554 and text.startswith(b"5.7.1")
