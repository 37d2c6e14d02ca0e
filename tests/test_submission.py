"""The submission listener: AUTH after STARTTLS, sender ownership, delivery, DSN."""

from __future__ import annotations

import base64
import hashlib
import re
import smtplib
import threading
import time
from pathlib import Path

import pytest

from gateway.passwords import hash_password
from tests.conftest import client_context, free_port, simple_message

pytestmark = pytest.mark.sqlite_only  # AUTH and sender checks happen before the store

PASSWORD = "correct horse battery"
WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: archive-replies
        match: {direction: outbound}
        actions: {bcc: [archive@vault.test]}
"""


@pytest.fixture(scope="module")
def password_hash():
    return hash_password(PASSWORD)


@pytest.fixture(scope="module")
def weak_hash():
    """PASSWORD hashed at the cost used before (scrypt N=2**14)."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return "$".join(["scrypt", "16384", "8", "1", base64.b64encode(salt).decode(),
                     base64.b64encode(digest).decode()])


@pytest.fixture
def gw(make_gateway, tmp_path, tls_files, password_hash, weak_hash, relay):
    _, chain, key = tls_files
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    gateway = make_gateway({
        "smtp": {"tls": {"cert_file": str(chain), "key_file": str(key)}},
        "submission": {"listen": f"127.0.0.1:{free_port()}", "max_auth_failures": 3},
        "policies": {"directory": str(policies)},
        "delivery": {"relay": f"127.0.0.1:{relay.port}", "relay_tls": "none",
                     "poll_interval": "0.2s", "retry_base": "1s"},
        "tenants": {"acme": {"users": {
            "agent@acme.test": {"password_hash": password_hash,
                                "send_as": ["support@acme.test", "sales-*@acme.test"]},
            "clerk@acme.test": {"password_hash": weak_hash}}}},
    })
    gateway.submission_port = int(gateway.config["submission"]["listen"].rsplit(":", 1)[1])
    gateway.wait_listening(port=gateway.submission_port)  # it opens just after the SMTP one
    return gateway


def _client(gw, tls_files, login=True, user="agent@acme.test"):
    ca = tls_files[0]
    s = smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30)
    s.ehlo("agent-laptop.test")
    s.starttls(context=client_context(ca))
    s.ehlo("agent-laptop.test")
    if login:
        s.login(user, PASSWORD)
    return s


def test_auth_only_after_starttls(gw):
    with smtplib.SMTP("127.0.0.1", gw.submission_port, timeout=30) as s:
        s.ehlo("x.test")
        assert not s.has_extn("auth")
        code, text = s.docmd("AUTH", _plain(PASSWORD))
        assert (code, text[:6]) == (538, b"5.7.11")
        assert s.docmd("MAIL", "FROM:<support@acme.test>")[0] == 530


def test_mail_needs_auth_and_mx_offers_none(gw, tls_files):
    s = _client(gw, tls_files, login=False)
    assert s.has_extn("auth") and "PLAIN" in s.esmtp_features["auth"]
    code, text = s.mail("support@acme.test")
    assert (code, text[:5]) == (530, b"5.7.0")
    s.quit()
    with gw.smtp() as mx:  # the MX listener authenticates nobody
        mx.ehlo()
        assert mx.docmd("AUTH", "PLAIN AGFAYgBj")[0] == 503


def _plain(password: str) -> str:
    return "PLAIN " + base64.b64encode(b"\0agent@acme.test\0" + password.encode()).decode()


def test_wrong_password_is_535_then_throttled(gw, tls_files):
    s = _client(gw, tls_files, login=False)
    for _ in range(2):
        code, text = s.docmd("AUTH", _plain("wrong password"))
        assert (code, text[:5]) == (535, b"5.7.8")
    code, text = s.docmd("AUTH", _plain("still wrong"))
    assert code == 421 and text.startswith(b"4.7.0")
    s.close()
    # The same client IP is turned away, even with the right password, for the window.
    s = _client(gw, tls_files, login=False)
    assert s.docmd("AUTH", _plain(PASSWORD))[0] == 421
    s.close()
    assert "agent@acme.test" not in gw.log() and PASSWORD not in gw.log()
    # one line per refusal, with the client's address, as the admin API writes them
    refusals = re.findall(r"WARNING gateway\.ingress\.submission: submission: authentication "
                          r"failed from (\S+): (.*)", gw.log())
    assert refusals == [("127.0.0.1", "wrong login or password")] * 3 + [
        ("127.0.0.1", "over 3 failures, turned away")] * 2
    # the fail2ban filter of docs/operations.md finds each of them, and nothing else
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    failregex = re.search(r"^failregex = (.*)$", docs, re.M).group(1)
    pattern = re.compile(failregex.replace("<HOST>", r"(?P<host>[0-9a-fA-F.:]+)"))
    found = [m.group("host") for ln in gw.log().splitlines() if (m := pattern.search(ln))]
    assert found == ["127.0.0.1"] * 5


def test_parallel_guesses_from_one_ip_get_no_more_passwords_checked(gw, tls_files):
    """Twenty sessions, logged in over TLS, send a wrong password at the same moment:
    no more than max_auth_failures (3) of them get the password checked."""
    clients = [_client(gw, tls_files, login=False) for _ in range(20)]
    line = f"AUTH {_plain('wrong password')}\r\n".encode()
    start = threading.Barrier(len(clients))
    replies: list[int] = []

    def guess(s: smtplib.SMTP) -> None:
        start.wait()
        s.send(line)
        replies.append(s.getreply()[0])

    threads = [threading.Thread(target=guess, args=(s,)) for s in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in clients:
        s.close()
    assert len(replies) == 20 and set(replies) <= {421, 535}, replies
    assert gw.log().count("authentication failed from 127.0.0.1: wrong login or") == 3


def test_auth_login_mechanism_and_unknown_user(gw, tls_files):
    s = _client(gw, tls_files, login=False)
    s.user, s.password = "agent@acme.test", PASSWORD
    assert s.auth("LOGIN", s.auth_login)[0] == 235
    s.quit()
    s = _client(gw, tls_files, login=False)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        s.login("nobody@acme.test", PASSWORD)
    s.close()


def test_a_user_sends_only_as_their_send_as_or_by_default_their_login(gw, tls_files):
    s = _client(gw, tls_files)  # send_as: support@acme.test, sales-*@acme.test
    for sender, code in (("ceo@globex.test", 553), ("<>", 553), ("billing@acme.test", 553),
                         ("agent@acme.test", 553), ("sales-x@acme.test.evil", 553),
                         ("Support@ACME.test", 250), ("sales-eu@acme.test", 250)):
        got, text = s.mail(sender)
        assert (got, text[:5]) == (code, b"5.7.1" if code == 553 else b"2.1.0"), sender
        s.rset()
    s.quit()
    s = _client(gw, tls_files, user="clerk@acme.test")  # no send_as: the login only
    for sender, code in (("postmaster@acme.test", 553), ("support@acme.test", 553),
                         ("nobody@acme.test", 553), ("clerk@acme.test", 250)):
        assert s.mail(sender)[0] == code, sender
        s.rset()
    s.quit()


def _from(*fields: str) -> bytes:
    return "".join(f"From: {f}\r\n" for f in fields).encode() + \
        b"To: customer@client.test\r\nSubject: hello\r\n\r\nHello.\r\n"


def test_the_header_from_must_be_the_users_too(gw, tls_files, relay):
    s = _client(gw, tls_files)
    for fields in (["CEO <ceo@globex.test>"], ["Support <support@acme.test>, ceo@globex.test"],
                   ['"support@acme.test" <billing@acme.test>'], ["not an address"],
                   ["support@acme.test", "ceo@globex.test"],  # each From counts
                   # comments nested past the address parser's depth, on folded lines
                   ["\r\n ".join(["(" * 900] * 4) + " support@acme.test"]):
        s.mail("support@acme.test")
        s.rcpt("customer@client.test")
        code, text = s.data(_from(*fields))
        assert (code, text[:5]) == (553, b"5.7.1"), (fields, text)
        assert b"header From not owned by user" in text
    s.sendmail("support@acme.test", ["customer@client.test"], _from("Sales <sales-eu@acme.test>"))
    s.quit()
    got = {m.rcpt_tos[0]: m for m in relay.wait(2)}  # and the rule's archive copy
    assert set(got) == {"customer@client.test", "archive@vault.test"}
    assert b"From: Sales <sales-eu@acme.test>" in got["customer@client.test"].data
    assert len(gw.messages()) == 1


def test_recipients_past_the_cap_do_not_end_the_session(gw, tls_files):
    s = _client(gw, tls_files)
    assert s.mail("support@acme.test")[0] == 250
    # max_recipients 5, max_errors 10: the 15 refused ones are within the overshoot
    replies = [s.rcpt(f"c{n}@client.test") for n in range(20)]
    assert [code for code, _ in replies] == [250] * 5 + [452] * 15
    assert replies[-1][1].startswith(b"4.5.3 Error: too many recipients")
    assert s.data(simple_message(sender="support@acme.test", to="c0@client.test"))[0] == 250
    s.quit()
    [row] = gw.messages()
    assert row["recipients"] == [f"c{n}@client.test" for n in range(5)]


def test_outbound_message_is_delivered_with_the_rule_copy(gw, tls_files, relay):
    s = _client(gw, tls_files)
    s.sendmail("support@acme.test", ["customer@client.test"],
               simple_message(subject="Re: your ticket", sender="support@acme.test",
                              to="customer@client.test"))
    s.quit()
    got = {m.rcpt_tos[0]: m for m in relay.wait(2)}
    assert set(got) == {"customer@client.test", "archive@vault.test"}
    assert all(m.mail_from == "support@acme.test" for m in got.values())
    assert b"archive@vault.test" not in got["customer@client.test"].data
    row = gw.wait_processed(1)[0]
    assert (row["direction"], row["submitted_by"], row["protocol"]) == (
        "outbound", "agent@acme.test", "ESMTPSA")


def test_failed_delivery_bounces_to_the_user_only(gw, tls_files, relay):
    relay.handler.mode = "permfail"
    s = _client(gw, tls_files)
    s.sendmail("support@acme.test", ["gone@client.test"],
               simple_message(subject="hello", sender="support@acme.test", to="gone@client.test"))
    s.quit()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = gw.messages()
        if len(rows) == 2 and all(r["status"] == "processed" for r in rows):
            break
        time.sleep(0.1)
    bounce = next(r for r in rows if r["mail_from"] == "")
    assert bounce["tenant_id"] == "acme" and bounce["recipients"] == ["support@acme.test"]
    assert bounce["subject"] == "Undelivered Mail Returned to Sender"
    raw = gw.store.raw(bounce["id"])
    assert b"Content-Type: multipart/report; report-type=delivery-status" in raw
    assert b"Final-Recipient: rfc822; gone@client.test" in raw
    assert b"Status: 5.1.1" in raw and b"Diagnostic-Code: smtp; 550 5.1.1" in raw
    failed = gw.store.list_deliveries(status="failed")
    # the user's recipient and the archive copy failed; only the recipient's bounced
    assert sorted(d["kind"] for d in failed) == ["bcc", "rcpt"]
    assert len([r for r in gw.messages() if r["mail_from"] == ""]) == 1


def test_a_hash_of_a_lower_cost_still_logs_in_and_is_reported(gw, tls_files, password_hash):
    """New hashes cost scrypt N=2**17 (OWASP's minimum); one made before still verifies,
    and the log and check say it should be replaced (it lives in gateway.yaml)."""
    assert password_hash.startswith("scrypt$131072$8$1$")
    _client(gw, tls_files, user="clerk@acme.test").quit()
    _client(gw, tls_files).quit()  # agent's hash is current: nothing said
    weak = [ln for ln in gw.log().splitlines() if "password hash of a lower cost" in ln]
    assert len(weak) == 1 and " WARNING " in weak[0]
    checked = gw.cli("check", check=True).stdout.decode()
    assert ("tenant acme: user clerk@acme.test: warning: the password hash costs less than "
            "scrypt N=131072") in checked
    assert "agent@acme.test" not in checked
