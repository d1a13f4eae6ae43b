"""The rule-based classifier: tenant keywords, fuzzy matching and hazard words."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz import fuzz

from ledger.classification.model import (
    PROMPT_VERSION,
    Classification,
    ExtractedFields,
    InvalidClassification,
    Provenance,
    Severity,
)
from ledger.tenants import Category

DEFAULT_HAZARD_WORDS = (
    "gas",
    "fire",
    "smoke",
    "flooding",
    "injury",
    "injured",
    "live wire",
    "sparking",
    "collapse",
    "sewage",
)
# Hazards that make a report critical rather than high.
CRITICAL_HAZARDS = frozenset({"gas", "fire", "injury", "injured", "live wire", "collapse"})

# A keyword whose best fuzzy match in the text scores below this (0 to 100) does not count.
MATCH_THRESHOLD = 85.0
SUMMARY_LENGTH = 120


@dataclass(frozen=True, slots=True)
class ReportText:
    """The parts of a report that classifiers read."""

    title: str | None = None
    description: str | None = None
    address: str | None = None

    def text(self) -> str:
        return " ".join(part for part in (self.title, self.description) if part)


class RuleClassifier:
    """Classify by the tenant's category keywords and hazard words; deterministic.

    A category scores 100 when its name or one of its keywords appears in the text as whole
    words, and otherwise the best `rapidfuzz.fuzz.partial_ratio` of them against the text.
    The highest score wins, ties going to the category listed first. When no score reaches
    MATCH_THRESHOLD the result names no category, with confidence 0, and still gives the
    severity from the hazard words.
    """

    def __init__(
        self, categories: Sequence[Category], hazard_words: Sequence[str] | None = None
    ) -> None:
        if not categories:
            raise InvalidClassification("the tenant has no categories to classify into")
        self.categories = list(categories)
        words = DEFAULT_HAZARD_WORDS if hazard_words is None else hazard_words
        self.hazard_words = [word.lower() for word in words]

    def classify(self, report: ReportText) -> Classification:
        text = _normalize(report.text())
        best: Category | None = None
        best_score = 0.0
        for category in self.categories:
            score = _category_score(category, text)
            if score > best_score:
                best, best_score = category, score
        confidence = best_score / 100
        if best_score < MATCH_THRESHOLD:
            best, confidence = None, 0.0

        hazards = [word for word in self.hazard_words if _contains_words(text, word)]
        return Classification(
            category=best.name if best is not None else None,
            severity=_severity(hazards),
            fields=ExtractedFields(location_text=report.address, hazards=hazards),
            summary=_summary(report),
            # The rules detect no language: "und" is the BCP 47 tag for undetermined.
            language="und",
            confidence=round(confidence, 3),
            provenance=Provenance(classifier="rules", prompt_version=PROMPT_VERSION),
        )


def _normalize(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _contains_words(text: str, phrase: str) -> bool:
    words = _normalize(phrase)
    return bool(words) and f" {words} " in f" {text} "


def _category_score(category: Category, text: str) -> float:
    if not text:
        return 0.0
    best = 0.0
    for phrase in (category.name, *category.keywords):
        words = _normalize(phrase)
        if not words:
            continue
        if _contains_words(text, words):
            return 100.0
        best = max(best, fuzz.partial_ratio(words, text))
    return best


def _severity(hazards: Sequence[str]) -> Severity:
    if any(hazard in CRITICAL_HAZARDS for hazard in hazards):
        return "critical"
    if hazards:
        return "high"
    return "low"


def _summary(report: ReportText) -> str:
    line = " ".join((report.title or report.description or "").split())
    if not line:
        return "(no text)"
    if len(line) > SUMMARY_LENGTH:
        return line[: SUMMARY_LENGTH - 1] + "…"
    return line
