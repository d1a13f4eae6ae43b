"""The result of classifying one report, as recorded in a ReportClassified event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SEVERITIES = ("low", "medium", "high", "critical")
Severity = Literal["low", "medium", "high", "critical"]
ClassifierName = Literal["llm", "rules"]

# Changed whenever the prompt or the schema changes, so that results can be grouped by it.
PROMPT_VERSION = "2026-12-1"


class InvalidClassification(ValueError):
    """A response that is not a valid classification for the tenant; the message has the reason."""


class ExtractedFields(BaseModel):
    """Facts read from the report's text."""

    model_config = ConfigDict(extra="forbid")

    location_text: str | None = Field(default=None, max_length=500)
    asset: str | None = Field(default=None, max_length=200)
    hazards: list[str] = Field(default_factory=list, max_length=20)


class Provenance(BaseModel):
    """The classifier, model and prompt version behind a result."""

    model_config = ConfigDict(extra="forbid")

    classifier: ClassifierName
    model: str | None = None
    prompt_version: str


class Answer(BaseModel):
    """The fields a classifier decides: what the language model is asked to return."""

    model_config = ConfigDict(extra="forbid")

    category: str = Field(min_length=1, max_length=200)
    severity: Severity
    fields: ExtractedFields
    summary: str = Field(min_length=1, max_length=300)
    language: str = Field(min_length=2, max_length=35)
    confidence: float = Field(ge=0.0, le=1.0)

    @field_validator("summary")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return " ".join(value.split())


class Classification(Answer):
    """An answer with its provenance.

    The category is None when the rule-based classifier found no category in the text: the
    result still records the severity and the extracted fields, and the report keeps the
    category it had. A language model's answer always names a category.
    """

    category: str | None = Field(min_length=1, max_length=200)  # type: ignore[assignment]
    provenance: Provenance


def validate_answer(data: Any, categories: Sequence[str]) -> Answer:
    """Validate a decoded answer against the model and the tenant's categories.

    Raises InvalidClassification with the first problem: a missing or malformed field, or a
    category that is not one of `categories`.
    """
    try:
        answer = Answer.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "answer"
        raise InvalidClassification(f"invalid answer at {where}: {first['msg']}") from error
    if answer.category not in categories:
        raise InvalidClassification(
            f"unknown category {answer.category!r}: the tenant's categories are "
            f"{', '.join(categories)}"
        )
    return answer


def answer_schema(categories: Sequence[str]) -> dict[str, Any]:
    """Build the JSON schema of an answer whose category is one of `categories`."""
    string_or_null = {"type": ["string", "null"]}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["category", "severity", "fields", "summary", "language", "confidence"],
        "properties": {
            "category": {"type": "string", "enum": list(categories)},
            "severity": {"type": "string", "enum": list(SEVERITIES)},
            "fields": {
                "type": "object",
                "additionalProperties": False,
                "required": ["location_text", "asset", "hazards"],
                "properties": {
                    "location_text": string_or_null,
                    "asset": string_or_null,
                    "hazards": {"type": "array", "items": {"type": "string"}},
                },
            },
            "summary": {"type": "string", "description": "One line"},
            "language": {"type": "string", "description": "BCP 47 tag of the report's language"},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
    }
