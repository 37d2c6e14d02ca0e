"""Values as gateway.yaml writes them: sizes, durations, host:port, host names; and
the base of every section."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
)

ENV_PREFIX = "MAILFLOWR_"

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}$")


def parse_size(value: Any) -> Any:
    """Accept 10240000, "10MB", "25 MiB"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as 10240000, 10MB or 25MiB, got {value!r}")
        return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    return value


def parse_duration(value: Any) -> Any:
    """Accept 30, 0.5, "30s", "5m", "250ms"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value)
        if not m or m.group(2) not in _DURATION_UNITS:
            raise ValueError(f"expected a duration such as 30, 30s, 5m or 250ms, got {value!r}")
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
# How long a dead instance's claims wait before others take them (renewed while alive).
LeaseTime = Annotated[float, BeforeValidator(parse_duration), Field(ge=1)]


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:2525' or '[::1]:2525' -> (host, port); ValueError with a clear text."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT (IPv6 as [::1]:PORT), got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def _hostport(value: str | None) -> str | None:
    if value is not None:
        parse_hostport(value)
    return value


OptionalHostPort = Annotated[str | None, AfterValidator(_hostport)]


def host_name(value: str) -> str:
    """A host name, an IP address, or an IPv6 address in brackets."""
    if value.startswith("[") and value.endswith("]"):
        return value
    if not HOSTNAME.match(value.lower()) and not re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", value):
        raise ValueError(f"not a host name or address: {value!r}")
    return value


HostName = Annotated[str, AfterValidator(host_name)]


def config_folder(info: ValidationInfo) -> Path | None:
    """The folder of the file being read (``load`` passes it as the context), which
    relative paths are read from; None for settings not read from a file."""
    base = (info.context or {}).get("base")
    return base if isinstance(base, Path) else None


def in_folder(base: Path, value: Path) -> Path:
    """``value`` read from the folder ``base`` (a physical path: ``load`` resolves it):
    its leading ``..`` are taken off ``base`` (/etc/gw and ../var: /etc/var), as the
    kernel would; any later ``..`` is kept, a link before it may lead elsewhere."""
    if value.is_absolute():
        return value
    parts = value.parts
    up = next((n for n, part in enumerate(parts) if part != ".."), len(parts))
    if up == 0 or ".." in parts[up:]:
        return base / value
    for _ in range(up):
        base = base.parent
    return base.joinpath(*parts[up:])


def _in_config_folder(value: Path, info: ValidationInfo) -> Path:
    base = config_folder(info)
    return value if base is None else in_folder(base, value)


# A file or folder named in gateway.yaml: a relative one is read from the folder of
# gateway.yaml, wherever the command runs (as Postfix reads main.cf's from its own).
ConfigPath = Annotated[Path, AfterValidator(_in_config_folder)]
# One that may be unset: empty is unset too, not the configuration's folder.
OptionalConfigPath = Annotated[ConfigPath | None,
                               BeforeValidator(lambda v: None if v == "" else v)]


class Section(BaseModel):
    """A section of gateway.yaml: unknown keys are errors, values never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)
