"""Every exception lookalike raises on purpose, in one place.

Each carries a short sentence that is safe to show a person::

    LookalikeError                 str(error) is a sentence meant for people
    ├── ConfigError                a setting is missing or makes no sense (names the variable)
    ├── DatasetNotFound            Fashion-MNIST is nowhere we look (says how to get it)
    ├── ModelLoadError             the CLIP checkpoint could not be loaded (names LOOKALIKE_MODEL)
    ├── IndexMismatch              an index on disk is not this model's, gallery's or format's
    ├── GalleryError               a gallery's images cannot be read (an empty folder...)
    ├── BuildFailed                a distributed index build cannot finish
    ├── ImageRejected              an upload is not an image we accept: the API answers 400
    ├── JobFailed                  a job cannot succeed: the worker stores the sentence in it
    ├── RequestRefused             the API refuses a request while reading it
    │   ├── HeadRefused            the request head breaks a limit or is too slow (414, 431, 408)
    │   ├── BodyRefused            the body is too large or too slow (413, 408)
    │   ├── MultipartRefused       the multipart body breaks a limit or is malformed (400)
    │   │   └── FileTooLarge       one file of it passed the per-file limit (413)
    │   └── FieldRefused           an item id, attributes, filter, min_score... is malformed (422)
    ├── QueryFailed                ``lookalike query``: the service refused or failed the query
    ├── FetchFailed                ``lookalike data fetch``: a file could not be downloaded
    │   └── ChecksumMismatch       a downloaded file is not the published one (names the file)
    └── BenchError                 ``lookalike bench`` cannot measure
        ├── BenchAborted           the warm-up could not reach the service
        └── HttpError              a connection of the load driver failed
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


class GalleryError(LookalikeError):
    """A gallery cannot be read (an empty folder, a missing path...)."""


class BuildFailed(LookalikeError):
    """A distributed build cannot finish; the message says why."""


class ImageRejected(LookalikeError):
    """An upload is not an image we accept (bad format, truncated, too large...)."""


class JobFailed(LookalikeError):
    """A job cannot succeed; the sentence is stored in the job record, the short ``reason``
    code (``bad_image``, ``upload_gone``, ``unknown_gallery``...) labels the metrics."""

    def __init__(self, sentence: str, *, reason: str = "rejected") -> None:
        super().__init__(sentence)
        self.reason = reason


class RequestRefused(LookalikeError):
    """The API refuses a request while reading it."""


class HeadRefused(RequestRefused):
    """The request line or headers break a limit (414, 431) or are too slow to arrive (408);
    raised inside the HTTP parser's callbacks (``api.edge``), before the app sees the request."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BodyRefused(RequestRefused):
    """The body is too large (413) or too slow to arrive (408); raised inside ``receive``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class MultipartRefused(RequestRefused):
    """A multipart body breaks a limit or is not multipart; ``kind`` says which."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind  # too_many_files | too_many_fields | field_too_large | malformed...


class FieldRefused(RequestRefused):
    """A field of a request (shared.items) is malformed; ``str(self)`` is the 422's sentence,
    which names the field."""


class FileTooLarge(MultipartRefused):
    """File ``number`` (from 1) passed the per-file limit while it was being read (413)."""

    def __init__(self, number: int) -> None:
        super().__init__("file_too_large")
        self.number = number


class QueryFailed(LookalikeError):
    """``lookalike query``: the service refused or failed the query; the message says why."""


class FetchFailed(LookalikeError):
    """``lookalike data fetch`` could not download a file; the message names it and why."""


class ChecksumMismatch(FetchFailed):
    """A downloaded file's SHA-256 is not the published one; the download was deleted."""

    def __init__(self, sentence: str, *, name: str) -> None:
        super().__init__(sentence)
        self.name = name


class BenchError(LookalikeError):
    """``lookalike bench`` cannot measure."""


class BenchAborted(BenchError):
    """The warm-up could not reach the service: timing the rest would measure nothing."""


class HttpError(BenchError):
    """The connection failed or the reply was not HTTP (the service was unreachable)."""
