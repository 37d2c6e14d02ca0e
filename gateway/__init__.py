"""MailFlowr Gateway: a durable SMTP gateway that stores, routes and keeps mail."""

__version__ = "0.1.0"
