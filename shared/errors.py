"""The small set of exceptions lookalike raises on purpose.

Each carries a short sentence that is safe to show a user: the API turns
:class:`ImageRejected` into a 400, the worker records :class:`JobFailed` in the job.
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base class: ``str(error)`` is a short sentence meant for people."""


class ConfigError(LookalikeError):
    """A setting is missing or makes no sense; the message names the variable."""


class DatasetNotFound(LookalikeError):
    """The gallery's files are nowhere we look; the message says how to get them."""


class ModelLoadError(LookalikeError):
    """The CLIP checkpoint could not be loaded; the message names LOOKALIKE_MODEL."""


class IndexMismatch(LookalikeError):
    """An index on disk does not belong to this model, gallery or preprocessing."""


class ImageRejected(LookalikeError):
    """An upload is not an image we accept (bad format, truncated, too large...)."""


class JobFailed(LookalikeError):
    """A job cannot succeed; the sentence is stored in the job record, the short ``reason``
    code (``bad_image``, ``upload_gone``, ``unknown_gallery``...) labels the metrics."""

    def __init__(self, sentence: str, *, reason: str = "rejected") -> None:
        super().__init__(sentence)
        self.reason = reason
