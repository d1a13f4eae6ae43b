"""The language-model classifier, for any server with the OpenAI chat completions API."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import openai

from ledger.classification.errors import (
    ClassifierUnavailable,
    InvalidAnswerError,
    RateLimited,
    TransientError,
)
from ledger.classification.model import (
    PROMPT_VERSION,
    Classification,
    InvalidClassification,
    Provenance,
    answer_schema,
    validate_answer,
)
from ledger.classification.rules import ReportText
from ledger.tenants import Category

logger = logging.getLogger(__name__)

# Pause used when a 429 response has no usable Retry-After header.
DEFAULT_RETRY_AFTER_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 600.0

SYSTEM_PROMPT = """You classify reports that residents send to their city.
Answer with one JSON object and nothing else, matching the given JSON schema.
category: exactly one of the listed categories.
severity: low, medium, high or critical; critical when people are in danger now.
fields.location_text: the place the report names, as written, or null.
fields.asset: the public asset concerned (a streetlight, a hydrant...), or null.
fields.hazards: dangers the report mentions, such as gas, fire or flooding.
summary: one line in English. language: the BCP 47 tag of the report's language.
confidence: your confidence in the category, from 0 to 1."""

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def decode_json_object(text: str) -> Any:
    """Decode the JSON object in a model response.

    Reads a bare object, an object inside a ``` fence, or the first object surrounded by
    prose. Raises InvalidClassification when there is no complete JSON object, for instance
    when the response was cut off.
    """
    stripped = text.strip()
    candidates = [stripped, *(match.strip() for match in _FENCE.findall(text))]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    decoder = json.JSONDecoder()
    for start in (index for index, char in enumerate(text) if char == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    preview = stripped[:80] + ("…" if len(stripped) > 80 else "")
    raise InvalidClassification(f"no complete JSON object in the response: {preview!r}")


class LLMClassifier:
    """Ask a chat model for a classification and validate its answer.

    The client makes one request per call: retries and pauses belong to the worker pool.
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeout_seconds: float,
        structured_output: bool = True,
    ) -> None:
        self.model = model
        self.structured_output = structured_output
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_seconds, max_retries=0
        )

    def close(self) -> None:
        self.client.close()

    def classify(self, report: ReportText, categories: Sequence[Category]) -> Classification:
        """Classify one report into one of `categories`.

        Raises TransientError, RateLimited, ClassifierUnavailable or InvalidAnswerError.
        """
        names = [category.name for category in categories]
        content = self._request(report, categories, names)
        try:
            answer = validate_answer(decode_json_object(content), names)
        except InvalidClassification as error:
            raise InvalidAnswerError(str(error)) from error
        return Classification(
            **answer.model_dump(),
            provenance=Provenance(
                classifier="llm", model=self.model, prompt_version=PROMPT_VERSION
            ),
        )

    def _request(self, report: ReportText, categories: Sequence[Category], names: list[str]) -> str:
        lines = []
        for category in categories:
            hint = f" (words: {', '.join(category.keywords)})" if category.keywords else ""
            lines.append(f"- {category.name}{hint}")
        listing = "\n".join(lines)
        user = (
            f"Categories:\n{listing}\n\nReport title: {report.title or '(none)'}\n"
            f"Report text: {report.description or '(none)'}\n"
            f"Address given: {report.address or '(none)'}"
        )
        extra: dict[str, Any] = {}
        if self.structured_output:
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "classification",
                    "schema": answer_schema(names),
                    "strict": True,
                },
            }
        try:
            completion = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": user},
                ],
                temperature=0,
                **extra,
            )
        except openai.RateLimitError as error:
            if _is_quota_error(error):
                raise ClassifierUnavailable(f"quota exhausted: {_describe(error)}") from error
            raise RateLimited(
                f"rate limited: {_describe(error)}", _retry_after(error.response.headers)
            ) from error
        except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
            raise ClassifierUnavailable(f"rejected credentials: {_describe(error)}") from error
        except openai.APITimeoutError as error:
            raise TransientError("request timed out") from error
        except openai.APIConnectionError as error:
            raise TransientError(f"connection failed: {error}") from error
        except openai.APIStatusError as error:
            if error.status_code >= 500:
                raise TransientError(f"server error: {_describe(error)}") from error
            raise InvalidAnswerError(f"request rejected: {_describe(error)}") from error

        if not completion.choices:
            raise InvalidAnswerError("the response has no choices")
        message = completion.choices[0].message.content
        if not isinstance(message, str) or not message:
            raise InvalidAnswerError("the response has no content")
        return message


def _describe(error: openai.APIStatusError) -> str:
    return f"HTTP {error.status_code}: {error.message}"[:300]


def _is_quota_error(error: openai.RateLimitError) -> bool:
    body = error.body if isinstance(error.body, dict) else {}
    nested = body.get("error") if isinstance(body.get("error"), dict) else body
    return isinstance(nested, dict) and nested.get("code") == "insufficient_quota"


def _retry_after(headers: Any) -> float:
    """Read Retry-After in seconds; HTTP dates are not read and get the default pause."""
    raw = headers.get("retry-after") if headers is not None else None
    try:
        seconds = float(raw) if raw is not None else DEFAULT_RETRY_AFTER_SECONDS
    except ValueError:
        seconds = DEFAULT_RETRY_AFTER_SECONDS
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
