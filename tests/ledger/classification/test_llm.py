"""Decoding language-model responses, and the requests sent to the server."""

from __future__ import annotations

import json

import pytest

from ledger.classification.errors import (
    ClassifierUnavailable,
    InvalidAnswerError,
    RateLimited,
    TransientError,
)
from ledger.classification.llm import LLMClassifier, decode_json_object
from ledger.classification.model import Classification, InvalidClassification, validate_answer
from ledger.classification.rules import ReportText
from ledger.tenants import Category
from tests.ledger.classification.fake_llm import Reply, completion, error, scripted_server

OBJECT = {"category": "Pothole", "severity": "low"}
TEXT = json.dumps(OBJECT)
CATEGORIES = [Category("Pothole"), Category("Streetlight")]
ANSWER = {
    "category": "Pothole",
    "severity": "high",
    "fields": {"location_text": None, "asset": "road", "hazards": ["flooding"]},
    "summary": "Deep pothole\nfilled with water",
    "language": "en",
    "confidence": 0.75,
}


@pytest.mark.parametrize(
    "answer",
    [
        TEXT,
        f"  {TEXT}\n",
        f"```json\n{TEXT}\n```",
        f"```\n{TEXT}\n```",
        f"Sure! Here it is:\n\n{TEXT}\n\nAnything else?",
        f"Note {{braces}} first, then {TEXT}",
    ],
)
def test_decode_reads_object(answer: str) -> None:
    assert decode_json_object(answer) == OBJECT


@pytest.mark.parametrize(
    "answer",
    ["", "no JSON here", TEXT[:-1], '```json\n{"category": "Pot', "[1, 2]"],
)
def test_decode_rejects_incomplete(answer: str) -> None:
    with pytest.raises(InvalidClassification, match="no complete JSON object"):
        decode_json_object(answer)


def test_validate_answer_checks_category() -> None:
    assert validate_answer(ANSWER, ["Pothole"]).summary == "Deep pothole filled with water"
    with pytest.raises(InvalidClassification, match="unknown category 'Pothole'"):
        validate_answer(ANSWER, ["Streetlight"])


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"severity": "urgent"}, "severity"),
        ({"confidence": 1.5}, "confidence"),
        ({"fields": {"hazards": "gas"}}, "fields.hazards"),
        ({"extra": 1}, "extra"),
    ],
)
def test_validate_answer_names_field(change: dict[str, object], where: str) -> None:
    with pytest.raises(InvalidClassification, match=f"at {where}"):
        validate_answer({**ANSWER, **change}, ["Pothole"])


def classify(replies: list[Reply], timeout: float = 2.0) -> Classification:
    with scripted_server(replies) as server:
        classifier = LLMClassifier(
            base_url=server.base_url, api_key="k", model="m", timeout_seconds=timeout
        )
        try:
            return classifier.classify(ReportText("Pothole", "deep"), CATEGORIES)
        finally:
            classifier.close()


def test_llm_classify_returns_provenance() -> None:
    result = classify([completion(json.dumps(ANSWER))])
    assert result.category == "Pothole"
    provenance = result.provenance
    assert provenance.classifier == "llm"
    assert provenance.model == "m"


@pytest.mark.parametrize(
    ("reply", "kind", "message"),
    [
        (error(500, "boom"), TransientError, "HTTP 500"),
        (error(502, "bad gateway"), TransientError, "HTTP 502"),
        (error(429, "slow", retry_after="7"), RateLimited, "HTTP 429"),
        (error(401, "bad key"), ClassifierUnavailable, "HTTP 401"),
        (error(403, "forbidden"), ClassifierUnavailable, "HTTP 403"),
        (error(429, "quota", code="insufficient_quota"), ClassifierUnavailable, "quota"),
        (error(400, "bad request"), InvalidAnswerError, "HTTP 400"),
        (completion(""), InvalidAnswerError, "no content"),
    ],
)
def test_llm_errors_sorted(reply: Reply, kind: type[Exception], message: str) -> None:
    with pytest.raises(kind, match=message):
        classify([reply])


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("soon", 5.0), ("99999", 600.0)])
def test_llm_reads_retry_after(header: str, seconds: float) -> None:
    with pytest.raises(RateLimited) as raised:
        classify([error(429, "slow", retry_after=header)])
    assert raised.value.retry_after == seconds


def test_llm_times_out() -> None:
    with pytest.raises(TransientError, match="timed out"):
        classify([Reply(body=completion("{}").body, delay_seconds=2.0)], timeout=0.3)
