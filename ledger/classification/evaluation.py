"""Measure a classifier against labelled cases: accuracy and F1 per category."""

from __future__ import annotations

import csv
import gzip
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ledger.classification.rules import ReportText, RuleClassifier
from ledger.tenants import Category


@dataclass(frozen=True, slots=True)
class CategoryScore:
    category: str
    support: int  # cases labelled with the category
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True, slots=True)
class EvaluationResult:
    cases: int
    accuracy: float
    macro_f1: float
    per_category: list[CategoryScore]
    unmatched: int = 0  # cases for which the classifier named no category


def score(pairs: Sequence[tuple[str | None, str]]) -> EvaluationResult:
    """Score (predicted, expected) pairs; a predicted None means no category was named.

    Macro-F1 averages the F1 of every category that is expected or predicted at least once,
    so a category that the classifier never gets right counts as 0. A case with no category
    named counts against the recall of its label and against accuracy.
    """
    if not pairs:
        raise ValueError("no cases to score")
    true_positives: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    unmatched = 0
    for guess, label in pairs:
        expected[label] += 1
        if guess is None:
            unmatched += 1
            continue
        predicted[guess] += 1
        if guess == label:
            true_positives[label] += 1

    scores = []
    for category in sorted(set(predicted) | set(expected)):
        hits = true_positives[category]
        precision = hits / predicted[category] if predicted[category] else 0.0
        recall = hits / expected[category] if expected[category] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append(CategoryScore(category, expected[category], precision, recall, f1))
    return EvaluationResult(
        cases=len(pairs),
        accuracy=sum(true_positives.values()) / len(pairs),
        macro_f1=sum(item.f1 for item in scores) / len(scores),
        per_category=scores,
        unmatched=unmatched,
    )


def majority_baseline(labels: Sequence[str]) -> EvaluationResult:
    """Score the classifier that always predicts the most frequent label."""
    majority = Counter(labels).most_common(1)[0][0]
    return score([(majority, label) for label in labels])


@dataclass(frozen=True, slots=True)
class LabelledSet:
    """Categories with keywords from the reference cases, and the held-out cases to test."""

    categories: list[Category]
    cases: list[tuple[ReportText, str]]


def boston_labelled_set(path: Path, limit: int | None = None) -> LabelledSet:
    """Read a Boston 311 export into categories (REASON) and held-out cases.

    Cases whose CASE_TITLE differs from TYPE are the held-out cases: their title is the input
    and their REASON the label. The keywords of each category are the TYPE values of the
    other cases only, so nothing about the held-out cases reaches the classifier. `limit`
    keeps the first held-out cases.
    """
    keywords: dict[str, set[str]] = defaultdict(set)
    cases: list[tuple[ReportText, str]] = []
    with gzip.open(path, "rt", newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            reason, title, kind = row["REASON"], row["CASE_TITLE"], row["TYPE"]
            if not reason:
                continue
            if title == kind:
                keywords[reason].add(kind)
            elif limit is None or len(cases) < limit:
                cases.append((ReportText(title=title), reason))
    labels = {label for _, label in cases} | set(keywords)
    categories = [Category(name, None, tuple(sorted(keywords[name]))) for name in sorted(labels)]
    return LabelledSet(categories, cases)


def evaluate_rules(labelled: LabelledSet) -> EvaluationResult:
    classifier = RuleClassifier(labelled.categories)
    return evaluate(lambda report: classifier.classify(report).category, labelled.cases)


def evaluate(
    classify: Callable[[ReportText], str | None], cases: Iterable[tuple[ReportText, str]]
) -> EvaluationResult:
    return score([(classify(report), label) for report, label in cases])
