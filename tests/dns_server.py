"""A DNS server on loopback UDP that answers from a test zone (no public DNS in tests)."""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def txt(record: str) -> list[str]:
    """A TXT record as zone data: one record of strings of at most 255 octets (RFC 1035)."""
    return [" ".join(f'"{record[i:i + 255]}"' for i in range(0, len(record), 255))]


class ZoneServer:
    """zone: {(name, type): [rdata text, ...]}; names in ``servfail`` answer SERVFAIL.

    A name with no record of any type is NXDOMAIN; a known name without the asked
    type is an empty answer (NOERROR, no data).
    """

    def __init__(self, zone: dict[tuple[str, str], list[str]],
                 servfail: set[str] | None = None, port: int = 0) -> None:
        self.zone = {(n.lower().rstrip("."), t.upper()): v for (n, t), v in zone.items()}
        self.names = {n for n, _ in self.zone}
        self.servfail = {n.lower() for n in (servfail or set())}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text().rstrip(".").lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            if name in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name not in self.names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif (name, rdtype) in self.zone:
                response.answer.append(dns.rrset.from_text_list(
                    question.name, 300, dns.rdataclass.IN, rdtype, self.zone[(name, rdtype)]))
            self.sock.sendto(response.to_wire(), peer)

    def stop(self) -> None:
        self.sock.close()
