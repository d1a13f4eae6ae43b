"""The rule-based classifier: keywords, fuzzy matches, hazard words."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger.classification.model import InvalidClassification
from ledger.classification.rules import ReportText, RuleClassifier
from ledger.tenants import Category

CATEGORIES = [
    Category("Pothole", "Streets", ("pothole", "road hole")),
    Category("Streetlight", "Lighting", ("streetlight", "lamp post")),
    Category("Graffiti", "Parks", ("graffiti", "spray paint")),
]


@pytest.mark.parametrize(
    ("title", "description", "category"),
    [
        ("Pothole", None, "Pothole"),
        (None, "There is a deep road hole near the school", "Pothole"),
        ("Lamp post dark", "the lamp post on 5th is out", "Streetlight"),
        # Misspelled: found by fuzzy matching.
        ("Streetlite broken", None, "Streetlight"),
        ("Grafitti on the wall", None, "Graffiti"),
        # Nothing matches: no category.
        ("Noise at night", "Loud music", None),
        (None, None, None),
    ],
)
def test_rules_pick_category(
    title: str | None, description: str | None, category: str | None
) -> None:
    result = RuleClassifier(CATEGORIES).classify(ReportText(title, description))
    assert result.category == category
    assert result.provenance.classifier == "rules"


def test_rules_confidence_zero_without_match() -> None:
    result = RuleClassifier(CATEGORIES).classify(ReportText("Noise at night"))
    assert result.confidence == 0.0
    assert result.category is None
    matched = RuleClassifier(CATEGORIES).classify(ReportText("Pothole"))
    assert matched.confidence == 1.0


@pytest.mark.parametrize(
    ("text", "severity", "hazards"),
    [
        ("Pothole on Main St", "low", []),
        ("Sewage coming up from the pothole", "high", ["sewage"]),
        ("I smell gas near the pothole", "critical", ["gas"]),
        ("A live wire is sparking on the road", "critical", ["live wire", "sparking"]),
        # Whole words only: "gasket" is no gas.
        ("A gasket lies in the road", "low", []),
    ],
)
def test_rules_severity_from_hazards(text: str, severity: str, hazards: list[str]) -> None:
    result = RuleClassifier(CATEGORIES).classify(ReportText(None, text))
    assert result.severity == severity
    assert result.fields.hazards == hazards


def test_rules_use_tenant_hazard_words() -> None:
    classifier = RuleClassifier(CATEGORIES, hazard_words=["ice"])
    result = classifier.classify(ReportText("Ice and gas on the road"))
    assert result.fields.hazards == ["ice"]
    assert result.severity == "high"


def test_rules_keep_address_and_summary() -> None:
    long_title = "Pothole " + "x" * 300
    result = RuleClassifier(CATEGORIES).classify(ReportText(long_title, None, "1 Main St"))
    assert result.fields.location_text == "1 Main St"
    assert len(result.summary) == 120
    assert "\n" not in result.summary


def test_rules_reject_tenant_without_categories() -> None:
    with pytest.raises(InvalidClassification, match="no categories"):
        RuleClassifier([])


names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20)
category_lists = st.lists(
    st.builds(Category, names, st.none(), st.lists(names, max_size=3).map(tuple)),
    min_size=1,
    max_size=6,
    unique_by=lambda category: category.name,
)
texts = st.one_of(st.none(), st.text(max_size=200))


@given(category_lists, texts, texts)
def test_rules_deterministic_within_categories(
    categories: list[Category], title: str | None, description: str | None
) -> None:
    report = ReportText(title, description)
    first = RuleClassifier(categories).classify(report)
    second = RuleClassifier(list(categories)).classify(report)
    assert first == second
    if first.category is None:
        assert first.confidence == 0.0
    else:
        assert first.category in {category.name for category in categories}
        assert 0.0 < first.confidence <= 1.0
