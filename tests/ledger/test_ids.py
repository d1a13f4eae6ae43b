from __future__ import annotations

import time
import uuid

import pytest

from ledger.ids import (
    MAX_ORDERED_NUMBER,
    NAMESPACE,
    derived_id,
    derived_id_text,
    new_id,
    ordered_id_text,
)
from ledger.imports.boston import case_ids


@pytest.mark.parametrize("parts", [("a",), ("boston", "boston-311", "101001240734", "closed")])
def test_derived_id_is_uuid5(parts: tuple[str, ...]) -> None:
    assert derived_id_text(*parts) == str(uuid.uuid5(NAMESPACE, "/".join(parts)))
    assert derived_id(*parts) == uuid.uuid5(NAMESPACE, "/".join(parts))


def test_ordered_ids_sort_by_number() -> None:
    numbers = [0, 1, 101001240734, 101001240735, MAX_ORDERED_NUMBER]
    ids = [uuid.UUID(ordered_id_text(number, "t", str(number))) for number in numbers]

    assert ids == sorted(ids)
    assert all(value.version == 8 for value in ids)
    assert all(value.variant == uuid.RFC_4122 for value in ids)
    assert ids[2].int >> 80 == 101001240734


def test_ordered_id_depends_on_parts() -> None:
    assert ordered_id_text(7, "a") == ordered_id_text(7, "a")
    assert ordered_id_text(7, "a") != ordered_id_text(7, "b")


def test_ordered_id_rejects_large_number() -> None:
    with pytest.raises(ValueError, match="48-bit"):
        ordered_id_text(MAX_ORDERED_NUMBER + 1, "a")


def test_case_ids_fall_back_past_48_bits() -> None:
    long_case = str(MAX_ORDERED_NUMBER + 1)
    incident, submitted, closed = case_ids("t", long_case)

    assert incident == derived_id_text("t", "boston-311", long_case)
    assert closed == derived_id_text("t", "boston-311", long_case, "closed")
    assert submitted != closed


def test_case_ids_are_ordered_and_distinct() -> None:
    first = [uuid.UUID(value) for value in case_ids("t", "12")]
    second = [uuid.UUID(value) for value in case_ids("t", "13")]

    assert len(set(first)) == 3
    assert all(value.version == 8 for value in first)
    assert max(first) < min(second)
    assert case_ids("t", "12") != case_ids("u", "12")


def test_new_ids_sort_by_time() -> None:
    earlier = [new_id() for _ in range(50)]
    time.sleep(0.002)
    later = new_id()

    assert all(value < later for value in earlier)
    assert len(set(earlier)) == 50
    assert later.version == 7
    assert later.variant == uuid.RFC_4122
