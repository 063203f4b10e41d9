"""Cron expressions and time zones, checked where they are written.

Cron is cronsim's (it follows Debian cron, DST quirks included: see
server/triggers/schedules.py); zones are the IANA database through `zoneinfo`, with
the `tzdata` package as the fallback where the system has none.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import AfterValidator, BeforeValidator

# `@daily` and friends are not in every cron dialect (cronsim has none); these are their usual meanings.
CRON_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
# Any fixed instant will do to try an expression; a fixed one keeps validation pure.
_PROBE = datetime(2001, 1, 1, tzinfo=ZoneInfo("UTC"))


def zone(name: str) -> ZoneInfo:
    """An IANA time zone, or a ValueError that says what is expected."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin, "
                         "America/New_York or UTC") from None


def cron_expression(text: str) -> str:
    """The expression as cronsim reads it (macros expanded), or a ValueError naming the problem."""
    expr = CRON_MACROS.get(text.strip().lower(), text.strip())
    try:
        next(CronSim(expr, _PROBE))
    except CronSimError as exc:
        raise ValueError(f"invalid cron expression {text!r}: {exc} (five fields: minute hour day-of-month "
                         "month day-of-week, e.g. '0 19 * * MON-FRI'; a sixth, leading field is seconds)") from None
    except StopIteration:
        raise ValueError(f"cron expression {text!r} never fires") from None
    return expr


def _checked_zone(value: str) -> str:
    zone(value)
    return value


def _checked_cron(value: str) -> str:
    cron_expression(value)
    return value


def _day_or_instant(value: Any) -> Any:
    # Both `date | datetime` orders misread a string: date first takes "2026-03-01T00:00"
    # as a whole day, datetime first takes "2026-03-01" as its midnight. The form written
    # decides: a bare date is a day, anything with a time is an instant.
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
        return date.fromisoformat(value.strip())
    return value


TimeZoneName = Annotated[str, AfterValidator(_checked_zone)]
CronText = Annotated[str, AfterValidator(_checked_cron)]
# a day (`2026-03-01`) or a date-time (`2026-03-01T09:00`), as written
DayOrInstant = Annotated[datetime | date, BeforeValidator(_day_or_instant)]
