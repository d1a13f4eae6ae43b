"""GeoReport v2 parameters: formats, dates, ids, filters and the fields of a POST."""

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from api.open311_errors import Open311Error
from api.open311_format import CATEGORY_SLUG_SQL, FORMATS, OPEN311_OPEN_STATUSES

# The GeoReport v2 limits on GET requests: a window of at most 90 days, 90 days back from
# now when no date is given, and at most 1000 requests, the most recent first.
MAX_WINDOW = timedelta(days=90)
MAX_REQUESTS = 1000
MAX_DESCRIPTION = 4000


def check_format(value: str) -> str:
    if value not in FORMATS:
        raise Open311Error(404, f"unsupported format {value!r}: end the path with .json or .xml")
    return value


def split_values(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def parse_time(name: str, value: str, zone: ZoneInfo) -> datetime:
    """Read a W3C date and time; without an offset it is read in the tenant's time zone."""
    text = value.strip()
    # An unescaped "+" in a query string arrives as a space: "...T05:00:00 00:00".
    date_part, _, offset = text.partition(" ")
    if "T" in date_part and offset[:2].isdigit():
        text = f"{date_part}+{offset}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise Open311Error(
            400, f"invalid {name} {value!r}: use the W3C form, such as 2024-05-01T00:00:00Z"
        ) from error
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=zone)


def request_window(
    start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """Return the [start, end] window of GET requests, at most 90 days long."""
    if start is None and end is None:
        return now - MAX_WINDOW, now
    if start is None:
        assert end is not None
        return end - MAX_WINDOW, end
    if end is None:
        return start, start + MAX_WINDOW
    if end < start:
        raise Open311Error(
            400, f"end_date {end.isoformat()} is before start_date {start.isoformat()}"
        )
    if end - start > MAX_WINDOW:
        raise Open311Error(
            400,
            f"start_date {start.isoformat()} to end_date {end.isoformat()} spans more than "
            "90 days: ask for 90 days at most, in several requests if needed",
        )
    return start, end


def parse_ids(value: str) -> list[UUID]:
    ids = []
    for part in split_values(value):
        try:
            ids.append(UUID(part))
        except ValueError:
            raise Open311Error(
                400,
                f"invalid service_request_id {part[:100]!r}: use the ids that POST requests "
                "and GET requests return",
            ) from None
    if len(ids) > MAX_REQUESTS:
        raise Open311Error(
            400, f"{len(ids)} service_request_id values: ask for {MAX_REQUESTS} at most"
        )
    return ids


def unknown_code(code: str, codes: dict[str, Any]) -> str:
    known = ", ".join(codes) or "none: the tenant has no categories configured"
    return f"unknown service_code {code[:100]!r}; the tenant's service codes are {known}"


def code_conditions(requested: list[str], codes: dict[str, Any], params: list[Any]) -> list[str]:
    if not requested:
        return []
    names = [codes[code].name for code in requested if code in codes]
    # Incidents may carry categories the configuration no longer lists (imports, renames):
    # those match by the slug of their name.
    params.extend([names, requested])
    return [
        f"(i.category = ANY(%s) OR {CATEGORY_SLUG_SQL.replace('category', 'i.category')} = ANY(%s))"
    ]


def status_conditions(requested: list[str], params: list[Any]) -> list[str]:
    wanted = set(requested)
    unknown = sorted(wanted - {"open", "closed"})
    if unknown:
        raise Open311Error(400, f"invalid status {unknown[0][:100]!r}: use open or closed")
    if not wanted or wanted == {"open", "closed"}:
        return []
    params.append(sorted(OPEN311_OPEN_STATUSES))
    return ["i.status = ANY(%s)" if wanted == {"open"} else "NOT i.status = ANY(%s)"]


def report_from_form(
    codes: dict[str, Any],
    *,
    service_code: str | None,
    description: str | None,
    lat: str | None,
    long: str | None,
    address_string: str | None,
    media_url: str | None,
    reporter: dict[str, str | None],
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """Check a GeoReport POST and return the report and the reporter's contact details."""
    if not service_code:
        raise Open311Error(400, "missing service_code: use a code that GET services lists")
    if service_code not in codes:
        raise Open311Error(400, unknown_code(service_code, codes))
    report: dict[str, Any] = {"category": codes[service_code].name, "source_channel": "open311"}
    if (lat is None) != (long is None):
        raise Open311Error(400, "lat and long go together: send both, or neither")
    if lat is not None and long is not None:
        report["latitude"] = _coordinate("lat", lat, 90)
        report["longitude"] = _coordinate("long", long, 180)
    if address_string and address_string.strip():
        report["address"] = _text("address_string", address_string, 500)
    if "latitude" not in report and "address" not in report:
        raise Open311Error(
            400, "missing location: send lat and long, or address_string, with the request"
        )
    if description and description.strip():
        report["description"] = _text("description", description, MAX_DESCRIPTION)
    if media_url and media_url.strip():
        url = _text("media_url", media_url, 2000)
        if not url.startswith(("https://", "http://")):
            raise Open311Error(400, f"invalid media_url {url[:100]!r}: use an http(s) URL")
        report["media_url"] = url
    contact = {key: _text(key, value, 254) for key, value in reporter.items() if value}
    return report, contact or None


def _text(name: str, value: str, limit: int) -> str:
    text = value.strip()
    if len(text) > limit:
        raise Open311Error(400, f"{name} is {len(text)} characters long: send {limit} at most")
    if "\x00" in text:
        raise Open311Error(400, f"invalid {name}: it contains a NUL character")
    return text


def _coordinate(name: str, value: str, limit: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise Open311Error(
            400, f"invalid {name} {value[:50]!r}: send a decimal number of degrees (WGS84)"
        ) from None
    if not -limit <= number <= limit:
        raise Open311Error(400, f"invalid {name} {value[:50]!r}: use -{limit} to {limit}")
    return number
