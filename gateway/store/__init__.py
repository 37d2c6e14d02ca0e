"""Durable storage: schema, migrations, and the repository the daemon writes through."""
