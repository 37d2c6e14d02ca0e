"""gateway.imap against a real Dovecot: TLS, quoting, folder names, fetch, flags, IDLE."""

from __future__ import annotations

import asyncio
import os

import pytest

from gateway.config import ImapAccountConfig
from gateway.imap import ImapConnection, ImapError, encode_folder, parse_fetch, quoted, uid_set

PW = "MAILFLOWR_TEST_IMAP_PW"


@pytest.fixture(autouse=True)
def _password(monkeypatch):
    monkeypatch.setenv(PW, "secret")


def account(dovecot, user, **kw) -> ImapAccountConfig:
    return ImapAccountConfig.model_validate(dovecot.account(user, **kw))


async def connect(settings: ImapAccountConfig) -> ImapConnection:
    return await ImapConnection.open(settings, settings.password())


def test_modified_utf7_and_quoting():
    assert encode_folder("Entwürfe") == "Entw&APw-rfe"
    assert encode_folder("A&B") == "A&-B"
    assert encode_folder("日本語") == "&ZeVnLIqe-"
    assert encode_folder("plain/sub") == "plain/sub"
    assert quoted('say "hi" \\ there') == '"say \\"hi\\" \\\\ there"'
    for bad in ("a\r\nA1 DELETE INBOX", "x\n", "nul\x00"):
        with pytest.raises(ImapError):
            quoted(bad)
    assert uid_set([5, 1, 2, 3, 9, 10]) == "1:3,5,9:10"


def test_parse_fetch_literals_and_trailing_items():
    lines = [b"1 FETCH (UID 7 RFC822.SIZE 5 FLAGS (\\Seen) BODY[] {5}", bytearray(b"ab\r\nc"),
             b")", b"2 FETCH (BODY[]<0> {2}", bytearray(b"xy"), b" UID 9)",
             b"3 FETCH (FLAGS (\\Deleted))",  # unsolicited: no UID, ignored
             b"Fetch completed"]
    got = parse_fetch(lines)
    assert [(f.uid, f.size, f.flags, f.part("BODY[]")) for f in got] == [
        (7, 5, ("\\Seen",), b"ab\r\nc"), (9, None, (), b"xy")]


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_append_select_fetch_over_each_tls_mode(dovecot, tls):
    user = dovecot.user()
    data = b"Subject: kept\r\nMessage-ID: <a@b>\r\n\r\nbody \xc3\xa9\r\n"

    async def run():
        conn = await connect(account(dovecot, user, tls=tls))
        try:
            await conn.create("Archive/Entwürfe \"quoted\"")
            await conn.create("Archive/Entwürfe \"quoted\"")  # exists already: fine
            uid = await conn.append("Archive/Entwürfe \"quoted\"", data, ["\\Seen", "$Kept"])
            sel = await conn.select("Archive/Entwürfe \"quoted\"", readonly=True)
            found = await conn.uid_search("ALL")
            fetched = await conn.fetch(found, "(UID RFC822.SIZE FLAGS BODY.PEEK[])")
            return uid, sel, found, fetched
        finally:
            await conn.close()

    uid, sel, found, fetched = asyncio.run(run())
    assert found == [uid] and sel.exists == 1 and sel.uidvalidity > 0
    assert fetched[0].part("BODY[]") == data and fetched[0].size == len(data)
    assert set(fetched[0].flags) - {"\\Recent"} == {"\\Seen", "$Kept"}
    # and another client sees the same folder by its real name
    contents = dovecot.contents(user, "Archive/Entw&APw-rfe \"quoted\"")
    assert [c[2] for c in contents] == [data]


def test_hostile_names_never_reach_the_server_as_commands(dovecot):
    user = dovecot.user()

    async def run():
        conn = await connect(account(dovecot, user))
        try:
            with pytest.raises(ImapError):
                await conn.create("x\r\nA1 DELETE INBOX")
            await conn.create('evil" DELETE "INBOX')
            return await conn.select('evil" DELETE "INBOX', readonly=True)
        finally:
            await conn.close()

    assert asyncio.run(run()).exists == 0
    conn = dovecot.client(user)
    try:
        typ, boxes = conn.list()
        assert typ == "OK"
        assert any(b'evil\\" DELETE \\"INBOX' in b for b in boxes)
        assert conn.select("INBOX")[0] == "OK"  # still there
    finally:
        conn.logout()


def test_wrong_password_and_untrusted_certificate_are_clear_errors(dovecot, monkeypatch):
    user = dovecot.user()
    monkeypatch.setenv(PW, "wrong")
    with pytest.raises(ImapError, match=r"login as .* failed") as info:
        asyncio.run(connect(account(dovecot, user)))
    assert info.value.broken
    monkeypatch.setenv(PW, "secret")
    settings = account(dovecot, user, tls="implicit")
    settings = settings.model_copy(update={"ca_file": None})  # the system CAs only
    with pytest.raises(ImapError, match="certificate"):
        asyncio.run(connect(settings))


def test_refused_connection_is_an_error_not_a_hang(dovecot):
    settings = account(dovecot, dovecot.user()).model_copy(update={"port": 1})
    with pytest.raises(ImapError) as info:
        asyncio.run(connect(settings))
    assert info.value.broken


def test_idle_wakes_on_new_mail(dovecot):
    user = dovecot.user()

    async def run():
        conn = await connect(account(dovecot, user))
        try:
            await conn.select("INBOX", readonly=True)
            loop = asyncio.get_running_loop()
            started = loop.time()
            later = loop.run_in_executor(
                None, lambda: (__import__("time").sleep(0.5),
                               dovecot.fill(user, "INBOX", [b"Subject: new\r\n\r\nx\r\n"])))
            woke = await conn.idle(20)
            await later
            waited = loop.time() - started
            quiet = await conn.idle(0.5)  # nothing new: returns after its time
            return woke, waited, quiet, await conn.uid_search("ALL")
        finally:
            await conn.close()

    woke, waited, quiet, uids = asyncio.run(run())
    assert woke and waited < 10 and not quiet and len(uids) == 1


def test_password_file_must_be_private(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o644)
    with pytest.raises(ValueError, match="readable by everyone"):
        ImapAccountConfig(host="127.0.0.1", username="u", password_file=secret)
    os.chmod(secret, 0o600)
    settings = ImapAccountConfig(host="127.0.0.1", username="u", password_file=secret)
    assert settings.password() == "s3cret"
    assert settings.server_port == 993


def test_new_mail_announced_beside_another_answer_is_noticed(dovecot):
    """Dovecot tells of new messages with the answer to whatever command comes next;
    aioimaplib drops such lines, so a mailbox import would wait a whole interval."""
    user = dovecot.user()

    async def run():
        conn = await connect(account(dovecot, user))
        try:
            await conn.select("INBOX", readonly=True)
            conn.new_mail = False
            quiet = await conn.uid_search("ALL")
            before = conn.new_mail
            await asyncio.to_thread(dovecot.fill, user, "INBOX", [b"Subject: n\r\n\r\nx\r\n"])
            await conn.uid_search("ALL")  # its answer carries "* 1 EXISTS"
            return quiet, before, conn.new_mail
        finally:
            await conn.close()

    assert asyncio.run(run()) == ([], False, True)
