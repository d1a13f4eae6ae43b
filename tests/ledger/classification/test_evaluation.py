"""Scoring a classifier, and the labelled set read from a Boston export."""

from __future__ import annotations

import csv
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledger.classification.evaluation import (
    boston_labelled_set,
    evaluate_rules,
    majority_baseline,
    score,
)


def test_score_counts_per_category() -> None:
    pairs = [("a", "a"), ("a", "a"), ("b", "a"), ("b", "b"), ("a", "c")]
    result = score(pairs)
    assert result.cases == 5
    assert result.accuracy == pytest.approx(3 / 5)
    by_name = {item.category: item for item in result.per_category}
    assert by_name["a"].precision == pytest.approx(2 / 3)
    assert by_name["a"].recall == pytest.approx(2 / 3)
    assert by_name["b"].precision == pytest.approx(1 / 2)
    assert by_name["b"].recall == pytest.approx(1.0)
    assert by_name["c"].f1 == 0.0
    assert by_name["c"].support == 1
    f1_b = 2 * 0.5 * 1.0 / 1.5
    assert result.macro_f1 == pytest.approx((2 / 3 + f1_b + 0.0) / 3)


def test_score_rejects_empty() -> None:
    with pytest.raises(ValueError, match="no cases"):
        score([])


def test_majority_baseline_predicts_commonest() -> None:
    result = majority_baseline(["x", "x", "y"])
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.macro_f1 == pytest.approx((0.8 + 0.0) / 2)


HEADER = ["CASE_TITLE", "REASON", "TYPE"]
ROWS = [
    ["Street Light Outages", "Street Lights", "Street Light Outages"],
    ["Pothole Repair", "Highway Maintenance", "Pothole Repair"],
    ["Request for Pothole Repair", "Highway Maintenance", "Pothole Repair (Internal)"],
    ["street light out", "Street Lights", "Street Light Outages"],
    ["PRINTED", "Street Lights", "Street Light Outages"],
    ["", "", "Unlabelled"],
]


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "boston.csv.gz"
    with gzip.open(path, "wt", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(HEADER)
        writer.writerows(ROWS)
    return path


def test_boston_set_holds_out_retitled(export: Path) -> None:
    labelled = boston_labelled_set(export)
    assert [category.name for category in labelled.categories] == [
        "Highway Maintenance",
        "Street Lights",
    ]
    # Keywords come only from cases whose title equals their type.
    assert labelled.categories[0].keywords == ("Pothole Repair",)
    assert labelled.categories[1].keywords == ("Street Light Outages",)
    assert [(report.title, label) for report, label in labelled.cases] == [
        ("Request for Pothole Repair", "Highway Maintenance"),
        ("street light out", "Street Lights"),
        ("PRINTED", "Street Lights"),
    ]
    result = evaluate_rules(labelled)
    assert result.cases == 3
    # "PRINTED" matches nothing: no category is named, which counts as a miss.
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.unmatched == 1
    street_lights = next(s for s in result.per_category if s.category == "Street Lights")
    assert street_lights.recall == pytest.approx(1 / 2)
    assert street_lights.precision == 1.0


def test_cli_evaluate_prints_figures(export: Path) -> None:
    env = {**os.environ, "CIVICPULSE_LOG_LEVEL": "WARNING"}
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "classify", "evaluate", "--boston", str(export)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "accuracy 0.667" in output
    assert "majority-class baseline: accuracy 0.667" in output
