"""Exceptions that end a unit of work, shared by every stage.

Normal outcomes are return values; these are raised to end a message (or a
command) and are caught in one place per loop.
"""


class GatewayError(Exception):
    """Base of the gateway's own errors."""


class TempFailure(GatewayError):
    """Try again later: database down, disk full, a timeout (SMTP 4xx)."""


class ConfigError(GatewayError):
    """A configuration or policy file is invalid.

    Each entry of ``problems`` is a ready-to-print ``file:line: message``.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def one_line(exc: BaseException) -> str:
    """An exception as one log line: its class and the first line of its text (the
    driver's own message for a database error, without SQLAlchemy's SQL dump)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"
