"""MailFlowr Gateway: a durable SMTP gateway that stores, routes and keeps mail."""

# The one source of the version: pyproject.toml reads it from here (dynamic), and the
# daemon shows it in /status, the build_info metric, --version and exports.
__version__ = "0.2.0"
