"""DKIM signatures and verifications, and ARC seals, per second on this machine (one core).

    .venv/bin/python bench/dkim_speed.py [--seconds 3] [--size 4096]

Signs a message of --size bytes with a fresh RSA-2048 key and a fresh ed25519 key
the way the gateway does (gateway.auth.signing), then verifies the signatures with
the keys served from memory (no DNS: this measures the CPU cost only), and seals
the message with ARC (RSA only) as a forwarded copy is sealed.
"""

from __future__ import annotations

import argparse
import time

import dkim

from gateway import keyfiles
from gateway.auth import keys
from gateway.auth.signing import Signer


def rate(work, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    body = (b"x" * 70 + b"\r\n") * max(args.size // 72, 1)
    message = (b"From: Alice <alice@bench.test>\r\nTo: b@example.test\r\nSubject: bench\r\n"
               b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@bench.test>\r\n"
               b"\r\n" + body)
    records = {}
    for algorithm, selector in ((keyfiles.RSA, "rsa"), (keyfiles.ED25519, "ed")):
        private, public, bits = keyfiles.parse(keys.generate(algorithm), algorithm)
        key = keyfiles.SigningKey("bench.test", selector, algorithm, private, public, bits)
        records[f"{selector}._domainkey.bench.test."] = key.dns_record().encode()
        signer = Signer([key], {"bench": ["bench.test"]})
        signed = signer.sign(message, "bench").data

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
            return records.get(name.decode())

        assert dkim.DKIM(signed).verify(dnsfunc=dnsfunc)
        sign_rate = rate(lambda s=signer: s.sign(message, "bench"), args.seconds)
        verify_rate = rate(lambda d=signed, f=dnsfunc: dkim.DKIM(d).verify(dnsfunc=f),
                           args.seconds)
        print(f"{algorithm:15} {len(message):6} bytes  sign {sign_rate:7.0f}/s "
              f"({1000 / sign_rate:.2f} ms)  verify {verify_rate:7.0f}/s "
              f"({1000 / verify_rate:.2f} ms)")
        if algorithm == keyfiles.RSA:
            results = b"Authentication-Results: mx.bench.test; dkim=pass header.d=bench.test\r\n"
            seal_rate = rate(lambda s=signer, m=results + message: s.seal(m, "bench",
                                                                         "mx.bench.test"),
                             args.seconds)
            print(f"{'arc seal':15} {len(message):6} bytes  seal {seal_rate:7.0f}/s "
                  f"({1000 / seal_rate:.2f} ms)")


if __name__ == "__main__":
    main()
