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
