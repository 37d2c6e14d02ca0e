"""Which tenant owns a recipient address, and the SMTP reply when none does.

Pure: configured tenants in, a verdict out, no I/O.  The rules follow
Postfix's defaults for a server that is nobody's relay: an address is ours
only when its domain is one a tenant owns and its local part carries no
routing of its own.  Every open-relay trick (percent hack, quoted local part
with @, source route, bang path, address literal) is refused with
``554 5.7.1 Relay access denied`` before anything is looked up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config import TenantConfig
from gateway.srs import SRS, SRSError, is_srs

RELAY_DENIED = "554 5.7.1 <{addr}>: Relay access denied"
USER_UNKNOWN = "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
BAD_SYNTAX = "501 5.1.3 Bad recipient address syntax"
SRS_REFUSED = "550 5.7.1 <{addr}>: Recipient address rejected: {why}"
NEED_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send non-ASCII addresses"

_ROUTING_CHARS = ("@", "%", "!", ":")


@dataclass(frozen=True, slots=True)
class Accepted:
    tenant_id: str
    address: str  # as given, with the domain in lower case


@dataclass(frozen=True, slots=True)
class Refused:
    reply: str
    # a metric label: relay, unknown_user, syntax, smtputf8, srs_forged, srs_expired,
    # srs_malformed
    reason: str


def has_unsafe_chars(address: str) -> bool:
    """CR, LF, NUL, other controls or spaces outside quotes: never on the wire."""
    return any(ord(c) < 33 or ord(c) == 127 for c in address)


def printable(address: str) -> str:
    """The address as it may appear inside a reply: printable, short."""
    text = "".join(c if 32 < ord(c) < 127 else "?" for c in address)
    return text[:256]


class SendAs:
    """The addresses one submission user may send as (Postfix's
    ``smtpd_sender_login_maps``): their ``send_as`` list, where ``*`` in a local part
    matches any text, or only their own login address when the list is empty."""

    def __init__(self, login: str, patterns: Iterable[str]) -> None:
        alternatives = [re.escape(p.lower()).replace(r"\*", "[^@]*") for p in patterns]
        self._match = re.compile(
            "|".join(alternatives) if alternatives else re.escape(login.lower())).fullmatch

    def owns(self, address: str) -> bool:
        return bool(address) and self._match(address.lower()) is not None

    def header_refusal(self, addresses: list[str] | None) -> str | None:
        """Of the header From ``addresses`` (``headers.from_addresses``), the first the
        user does not own; ``(unreadable)`` when a From field could not be read; None
        when all are theirs."""
        if addresses is None:
            return "(unreadable)"
        return next((a for a in addresses if not self.owns(a)), None)


DELIMITER = "+"  # between an address's local part and its detail: support+x@ is support@'s


def subaddress(address: str, base: str, delimiter: str = DELIMITER) -> str | None:
    """Of ``address``, the detail after the recipient delimiter when it is ``base``'s
    (``privacy+acme@x`` of ``privacy@x``: ``acme``), ``""`` when it is ``base`` itself
    (any case), None when it is another address."""
    local, _, domain = address.rpartition("@")
    base_local, _, base_domain = base.rpartition("@")
    if domain.lower().rstrip(".") != base_domain.lower() or not local:
        return None
    if local.lower() == base_local.lower():
        return ""
    if delimiter and local.lower().startswith(base_local.lower() + delimiter):
        return local[len(base_local) + len(delimiter):]
    return None


class TenantDirectory:
    """Every tenant's domains and addresses, ready for lookups."""

    def __init__(self, tenants: Mapping[str, TenantConfig],
                 recipient_delimiter: str = DELIMITER) -> None:
        self.recipient_delimiter = recipient_delimiter
        self._domain_owner: dict[str, str] = {}
        self._addresses: set[str] = set()
        self._catch_all: set[str] = set()
        # Deactivated tenants (`tenant deactivate`): their recipients are refused as
        # unknown.  The daemon keeps this current from the database.
        self.inactive: frozenset[str] = frozenset()
        for tid, tenant in tenants.items():
            for domain in tenant.domains:
                self._domain_owner[domain] = tid
            if tenant.catch_all:
                self._catch_all.add(tid)
            self._addresses.update(a.lower() for a in tenant.addresses)

    def resolve(self, address: str, *, smtputf8: bool, srs: SRS | None = None
                ) -> Accepted | Refused:
        """Whose recipient this is. With ``srs``, SRS addresses in a tenant's domains
        are bounces to copies we forwarded: accepted only when ours and fresh."""
        shown = printable(address)
        if not address.isascii() and not smtputf8:
            return Refused(NEED_SMTPUTF8, "smtputf8")
        if has_unsafe_chars(address):
            return Refused(BAD_SYNTAX, "syntax")
        if address.startswith("@"):  # source route @a,@b:user@c
            return Refused(RELAY_DENIED.format(addr=shown), "relay")
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:  # bang path d!u, bare local part
            return Refused(RELAY_DENIED.format(addr=shown), "relay")
        if domain.startswith("["):  # address literal: we own no IP address
            return Refused(RELAY_DENIED.format(addr=shown), "relay")
        domain = domain.lower()
        if domain.endswith("."):
            domain = domain[:-1]
        tenant = self._domain_owner.get(domain)
        if tenant is None:
            return Refused(RELAY_DENIED.format(addr=shown), "relay")
        if tenant in self.inactive:
            return Refused(USER_UNKNOWN.format(addr=shown), "inactive")
        bare = local
        if len(bare) >= 2 and bare.startswith('"') and bare.endswith('"'):
            bare = bare[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if any(c in bare for c in _ROUTING_CHARS):
            # user%other@ours, "user@other"@ours, other!user@ours
            return Refused(RELAY_DENIED.format(addr=shown), "relay")
        canonical = f"{local}@{domain}"
        if srs is not None and is_srs(bare):
            try:
                srs.reverse(canonical)
            except SRSError as exc:
                return Refused(SRS_REFUSED.format(addr=shown, why=exc), f"srs_{exc.reason}")
            return Accepted(tenant, canonical)
        if tenant in self._catch_all:
            return Accepted(tenant, canonical)
        base = bare.lower()
        if self.recipient_delimiter and self.recipient_delimiter in base:
            base = base.split(self.recipient_delimiter, 1)[0]
        if f"{bare.lower()}@{domain}" in self._addresses or f"{base}@{domain}" in self._addresses:
            return Accepted(tenant, canonical)
        return Refused(USER_UNKNOWN.format(addr=shown), "unknown_user")
