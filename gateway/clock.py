"""Time as the gateway stores it: aware datetimes in UTC."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_months(moment: datetime, months: int) -> datetime:
    """The same day ``months`` calendar months on (or back); the month's last day where
    it has no such day (31 January + 1 month: 28 or 29 February)."""
    if not months:
        return moment
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)
