"""What the gateway does for data subjects and tenants: audit chain keys, erasure,
export, deactivation.  The command line and the admin API call these; the
store does the reading and deleting."""

from __future__ import annotations

import re

_ADDRESS = re.compile(r"[^\s@<>]{1,64}@[^\s@<>]{1,255}")


def subject_address(text: str) -> str | None:
    """The address a request names (a data subject, a recipient), or None when the
    text is not one; surrounding space and angle brackets are dropped."""
    value = text.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value if _ADDRESS.fullmatch(value) and value.isprintable() else None
