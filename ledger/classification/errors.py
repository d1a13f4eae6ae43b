"""Classification errors, one class for each action the worker pool takes next."""

from __future__ import annotations


class ClassifierError(Exception):
    """A classification attempt failed; `reason` is recorded in ClassificationFailed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientError(ClassifierError):
    """A timeout, a lost connection or a 5xx response: worth retrying after a backoff."""


class InvalidAnswerError(ClassifierError):
    """The model responded, but not with a valid classification: retrying would not help."""


class RateLimited(ClassifierError):
    """A 429 response: the pool pauses for `retry_after` seconds, then tries the item again."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class ClassifierUnavailable(ClassifierError):
    """A rejected API key, a forbidden model or an exhausted quota: the pool stops."""
