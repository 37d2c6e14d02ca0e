"""The DATA reader on chunks cut every way a TCP stream may be cut (no server)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.ingress.data import MAX_TEXT_LINE, DataReader, has_bare_newline, has_long_line


def _read(chunks: list[bytes], limit: int) -> tuple[bytes | None, bytes]:
    """(content, everything after the end of data: what the command reader gets)."""
    loop = asyncio.new_event_loop()
    try:
        reader = DataReader(limit, loop.create_future())
        for n, chunk in enumerate(chunks):
            rest = reader.feed(chunk)
            if rest is not None:
                assert reader.future.done()
                return reader.future.result(), rest + b"".join(chunks[n + 1:])
        raise AssertionError("the end of data was never found")
    finally:
        loop.close()


BODY = b"Subject: x\r\n\r\n" + b"y" * 70 + b"\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7, 64, 1000])
def test_end_found_across_any_chunk_boundary(cut):
    stream = BODY + b".\r\nQUIT\r\n"
    chunks = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    assert _read(chunks, limit=10_000) == (BODY, b"QUIT\r\n")


def test_empty_message():
    assert _read([b".\r\n"], limit=100) == (b"", b"")


@pytest.mark.parametrize("split", [None, 150, 290])
def test_oversize_is_refused_whichever_chunk_carries_the_end(split):
    stream = b"z" * 70 + b"\r\n"
    stream = stream * 4 + b".\r\n"  # 288 octets of content, limit 200
    chunks = [stream] if split is None else [stream[:split], stream[split:]]
    content, _ = _read(chunks, limit=200)
    assert content is None


def test_content_at_the_limit_is_accepted():
    content = b"a" * 198 + b"\r\n"
    assert _read([content + b".\r\n"], limit=200)[0] == content


STUFFED = (b"..starts with a dot\r\n"
           b"middle\r\n"
           b"..\r\n"          # a line that is one dot
           b".\r\r\n"        # a dot, then a bare CR: not the end
           b"...three\r\n")
UNSTUFFED = b".starts with a dot\r\nmiddle\r\n.\r\n\r\r\n..three\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 6, 7, 13, 1000])
def test_stuffing_is_undone_across_any_chunk_boundary(cut):
    stream = STUFFED + b".\r\nQUIT\r\n"
    chunks = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    assert _read(chunks, limit=10_000) == (UNSTUFFED, b"QUIT\r\n")


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 64])
def test_a_message_without_stuffing_is_returned_as_sent(cut):
    body = b"Subject: x\r\n\r\nno dots. at all.\r\n \r\n"
    stream = body + b".\r\nQUIT\r\n"
    chunks = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    assert _read(chunks, limit=10_000) == (body, b"QUIT\r\n")


def test_long_lines_are_found_wherever_they_are():
    short = b"x" * 76 + b"\r\n"
    at_limit = b"y" * MAX_TEXT_LINE + b"\r\n"
    over = b"z" * (MAX_TEXT_LINE + 1) + b"\r\n"
    assert not has_long_line(b"")
    assert not has_long_line(short * 2000)
    assert not has_long_line(at_limit * 3 + short * 50 + at_limit)
    for where in (0, 1, 700, 2000):
        assert has_long_line(short * where + over + short * 3), where
    assert has_long_line(short * 9 + over)  # the last line
    assert has_long_line(b"w" * 5000)  # no line end at all


@pytest.mark.parametrize("content, bare", [
    (b"", False),
    (b"Subject: x\r\n\r\nbody\r\n", False),
    (b"\r\n\r\n", False),
    (b"Subject: x\r\n\r\nbare\nlf\r\n", True),
    (b"Subject: x\r\n\r\nbare\rcr\r\n", True),
    (b"\n", True),
    (b"\r", True),
    (b"line\r", True),  # a CR at the very end
    (b"\r\r\n\n", True),  # as many CRs as LFs, neither pair whole
    (b"\n\r", True),  # LF then CR: the counts agree, no CRLF
    (b"a\r\nb\n\rc\r\n", True),
])
def test_a_bare_cr_or_lf_is_found_however_the_counts_fall(content, bare):
    assert has_bare_newline(content) is bare
    # the same as counting CRLFs against CRs and LFs
    crlf = content.count(b"\r\n")
    assert bare == (content.count(b"\r") != crlf or content.count(b"\n") != crlf)
