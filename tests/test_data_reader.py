"""The DATA reader on chunks cut every way a TCP stream may be cut (no server)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.ingress.smtp import DataReader


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
