"""The export formats the importer reads, how a file's header names one, and the parser
entry points that run in the worker processes."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ledger.imports import boston, losangeles, nyc, open311
from ledger.imports.boston import ParsedChunk
from ledger.imports.requests import RowMapper, parse_requests


@dataclass(frozen=True)
class ImportFormat:
    """One export format: its columns (normalized header names) and how a row maps."""

    name: str
    label: str
    source: str
    columns: tuple[str, ...]
    required: tuple[str, ...]
    signature: tuple[str, ...]
    mapper: RowMapper | None  # None for Boston, which has a parser of its own


BOSTON = ImportFormat(
    "boston",
    "City of Boston 311 export",
    boston.SOURCE,
    boston.COLUMNS,
    boston.REQUIRED,
    boston.REQUIRED,
    None,
)
NYC = ImportFormat(
    "nyc",
    "NYC 311 service requests",
    nyc.SOURCE,
    nyc.COLUMNS,
    nyc.REQUIRED,
    nyc.SIGNATURE,
    nyc.request,
)
LOS_ANGELES = ImportFormat(
    "la",
    "Los Angeles MyLA311 service requests",
    losangeles.SOURCE,
    losangeles.COLUMNS,
    losangeles.REQUIRED,
    losangeles.SIGNATURE,
    losangeles.request,
)
OPEN311 = ImportFormat(
    "open311",
    "Open311 GeoReport v2 requests",
    open311.SOURCE,
    open311.COLUMNS,
    open311.REQUIRED,
    open311.SIGNATURE,
    open311.request,
)
FORMATS = {f.name: f for f in (BOSTON, NYC, LOS_ANGELES, OPEN311)}


class UnknownFormat(ValueError):
    """The header matches no format, or lacks a column the named format needs."""


def normalize(name: str) -> str:
    """Return a header name in lower case with runs of other characters as one "_".

    "Created Date", "created_date" and "CreatedDate" become "created_date", "created_date"
    and "createddate".
    """
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lstrip("\ufeff").lower()).strip("_")


def detect(header: Sequence[str]) -> ImportFormat:
    """Return the format whose signature columns the header has; raise UnknownFormat."""
    if all(name in [h.strip().lstrip("\ufeff") for h in header] for name in BOSTON.signature):
        return BOSTON
    names = {normalize(name) for name in header}
    for candidate in (NYC, LOS_ANGELES, OPEN311):
        if all(name in names for name in candidate.signature):
            return candidate
    expected = "; ".join(
        f"{f.name} ({', '.join(f.signature)})" for f in (BOSTON, NYC, LOS_ANGELES, OPEN311)
    )
    found = ", ".join(name for name in header if name.strip()) or "nothing"
    raise UnknownFormat(
        f"the header matches no known export format: found {found}; expected the columns "
        f"of one of {expected}; name the format with --format if the header is right"
    )


def column_indexes(fmt: ImportFormat, header: Sequence[str]) -> tuple[int, ...]:
    """Return the position of each of the format's columns in `header`, -1 when absent;
    raise UnknownFormat naming the required columns that are missing."""
    if fmt is BOSTON:
        try:
            return boston.column_indexes(list(header))
        except ValueError as error:
            raise UnknownFormat(str(error)) from error
    names = [normalize(name) for name in header]
    missing = [column for column in fmt.required if column not in names]
    if missing:
        raise UnknownFormat(
            f"not a file of {fmt.label}: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(name for name in header if name.strip()) or 'nothing'}"
        )
    return tuple(names.index(column) if column in names else -1 for column in fmt.columns)


def json_values(fmt: ImportFormat, item: Any) -> list[str] | None:
    """Return a JSON request's fields in the order of the format's columns, as text, or
    None when the item is not an object."""
    if not isinstance(item, dict):
        return None
    values = []
    for column in fmt.columns:
        value = item.get(column)
        if value is None:
            values.append("")
        elif isinstance(value, str):
            values.append(value)
        elif isinstance(value, bool):
            values.append("true" if value else "false")
        else:
            values.append(str(value))
    return values


def parse_rows(
    format_name: str,
    tenant_id: str,
    time_zone: str,
    source_file: str,
    now_text: str,
    rows: list[tuple[int, list[str]]],
    nul_possible: bool | None = None,
) -> ParsedChunk:
    """Parse rows already split into values (narrowed to the format's columns)."""
    fmt = FORMATS[format_name]
    if fmt.mapper is None:
        return boston.parse_chunk(tenant_id, time_zone, source_file, rows, nul_possible)
    return parse_requests(
        tenant_id,
        time_zone,
        source_file,
        rows,
        source=fmt.source,
        columns=fmt.columns,
        mapper=fmt.mapper,
        now_text=now_text,
        nul_possible=True if nul_possible is None else nul_possible,
    )


def parse_csv_block(
    format_name: str,
    tenant_id: str,
    time_zone: str,
    source_file: str,
    now_text: str,
    indexes: tuple[int, ...],
    width: int,
    delimiter: str,
    block: bytes,
) -> ParsedChunk:
    """Parse a block of whole CSV (or TSV) records in a worker process.

    Row numbers in the result count from 1 at the block's first record; rows with the
    wrong number of fields are rejected here.
    """
    text = block.decode("utf-8", errors="replace")
    rows: list[tuple[int, list[str]]] = []
    rejects: list[tuple[int, str]] = []
    number = 0
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            # The reader goes on with the next record. Keep the reason, not the csv
            # module's advice on opening files that follows " - ".
            number += 1
            reason = str(error).split(" - ")[0]
            rejects.append((number, f"invalid CSV: {reason}"))
            continue
        number += 1
        if len(values) != width:
            if values:
                rejects.append((number, f"row has {len(values)} fields, the header has {width}"))
            continue
        rows.append((number, [values[i] if i >= 0 else "" for i in indexes]))
    chunk = parse_rows(
        format_name, tenant_id, time_zone, source_file, now_text, rows, "\x00" in text
    )
    chunk.rejects = sorted(rejects + chunk.rejects)
    chunk.records = number
    return chunk


def parse_json_items(
    format_name: str,
    tenant_id: str,
    time_zone: str,
    source_file: str,
    now_text: str,
    items: list[Any],
) -> ParsedChunk:
    """Parse a list of requests from a JSON array in a worker process.

    Row numbers count from 1 at the list's first item; an item that is not an object is
    rejected.
    """
    fmt = FORMATS[format_name]
    rows: list[tuple[int, list[str]]] = []
    rejects: list[tuple[int, str]] = []
    for number, item in enumerate(items, start=1):
        values = json_values(fmt, item)
        if values is None:
            rejects.append((number, f"expected a JSON object, found {type(item).__name__}"))
            continue
        rows.append((number, values))
    chunk = parse_rows(format_name, tenant_id, time_zone, source_file, now_text, rows)
    chunk.rejects = sorted(rejects + chunk.rejects)
    chunk.records = len(items)
    return chunk


# The zone a new tenant gets when its first import names none. Open311 times carry offsets.
DEFAULT_TIME_ZONES = {
    "boston": "America/New_York",
    "nyc": "America/New_York",
    "la": "America/Los_Angeles",
    "open311": "UTC",
}
