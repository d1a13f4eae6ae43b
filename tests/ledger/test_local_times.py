from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.imports.boston import LocalTimeReader, RowRejected

ZONES = ["America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "America/St_Johns", "UTC"]
READERS = {name: LocalTimeReader(ZoneInfo(name)) for name in ZONES}


@settings(max_examples=400, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    moment=st.datetimes(min_value=datetime(2014, 1, 1), max_value=datetime(2016, 12, 31)),
)
def test_local_time_matches_zoneinfo(zone: str, moment: datetime) -> None:
    # The text has no fold, and the reader reads a repeated hour as its first occurrence.
    moment = moment.replace(microsecond=0, fold=0)
    text = moment.strftime("%m/%d/%Y %I:%M:%S %p")

    # One reader per zone across examples, so its per-hour cache is exercised too.
    expected = moment.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
    assert READERS[zone].utc_text(text, "OPEN_DT") == expected.isoformat(timespec="microseconds")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("13/01/2015 09:00:00 AM", "month must be in 1..12"),
        ("02/30/2015 09:00:00 AM", "day is out of range"),
        ("01/02/2015 00:15:00 AM", "hour must be 01 to 12"),
        ("01/02/2015 09:60:00 AM", "minute must be in 0..59"),
        ("01/02/2015 09:08:42 XM", "expected MM/DD/YYYY hh:mm:ss AM"),
        ("2015-01-02 09:08:42", "expected MM/DD/YYYY hh:mm:ss AM"),
    ],
)
def test_invalid_local_time_rejected(value: str, message: str) -> None:
    reader = LocalTimeReader(ZoneInfo("America/New_York"))
    reader.utc_text("01/02/2015 09:08:42 AM", "OPEN_DT")  # fill the cache for that hour

    with pytest.raises(RowRejected, match=message):
        reader.utc_text(value, "OPEN_DT")
