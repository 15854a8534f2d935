"""The shapes that travel between the API, Redis and the worker."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, model_validator

from shared.settings import FASHION_MNIST

Embeddings = npt.NDArray[np.float32]
"""A (n, dim) matrix of L2-normalised float32 rows."""


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class JobKind(StrEnum):
    IMAGE = "image"  # search with an uploaded image
    TEXT = "text"  # search with a text
    ITEM = "item"  # search with an item of the gallery ("more like this")
    ADD = "add"  # add (or replace) an item of a live gallery
    DUPLICATES = "duplicates"  # find the near-duplicate pairs of a gallery

    @property
    def searches(self) -> bool:
        return self in (JobKind.IMAGE, JobKind.TEXT, JobKind.ITEM)


class JobStage(StrEnum):
    """Where a running job is. The API decoded the upload when it accepted it, so a worker
    starts a job embedding it (the search that follows takes well under a millisecond, the
    result is stored at once). ``decoding`` is only seen in records of earlier versions."""

    EMBEDDING = "embedding"
    DECODING = "decoding"


class Match(BaseModel):
    rank: int = Field(description="1 for the closest match")
    item_id: str = Field(description="The item's id (a built gallery's: its position)")
    attributes: dict[str, Any] = Field(
        default_factory=dict, description="The item's attributes (built galleries: its class)"
    )
    index: int | None = Field(
        None, description="Position of the image in a built gallery (None in a live one)"
    )
    label: int | None = Field(None, description="Class number (built galleries)")
    label_name: str | None = Field(None, description="Class name, e.g. 'Sneaker' (built galleries)")
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity")
    image_url: str = Field("", description="The gallery image, as a PNG (add &size=N to scale)")
    path: str | None = Field(
        None, description="The image's file, relative to its folder (own galleries only)"
    )

    @model_validator(mode="before")
    @classmethod
    def _item_id_of_earlier_records(cls, data: Any) -> Any:
        """Results stored by an earlier version have an index and no item id: its position."""
        if isinstance(data, dict) and "item_id" not in data and data.get("index") is not None:
            return {**data, "item_id": str(data["index"])}
        return data


class ItemAdded(BaseModel):
    """What an add did to its item."""

    id: str
    gallery: str
    state: str = Field(
        description="indexed; or deleted (a delete of the item came after this add was "
        "accepted) or superseded (a later add of the item was committed first): unchanged"
    )
    version: int | None = Field(None, description="The gallery's version with this add in it")
    duplicate_of: str | None = Field(
        None, description="An item of the gallery with the same image bytes, if one was there"
    )


class DuplicatePair(BaseModel):
    a: str
    b: str
    score: float


class Duplicates(BaseModel):
    min_score: float
    pairs: list[DuplicatePair] = Field(description="Best first")
    groups: list[list[str]] = Field(description="Items linked by pairs, largest groups first")
    truncated: bool = Field(description="More pairs reached min_score than are listed")


class GalleryInfo(BaseModel):
    name: str
    size: int


class GallerySummary(BaseModel):
    """A gallery jobs can search."""

    name: str
    size: int = Field(description="Items in the gallery")
    model: str = Field(
        description="The CLIP checkpoint its index was built with (live: created for)"
    )
    kind: str = Field(
        description="fashion-mnist, folder (your own images, built) or live (changed through "
        "the API while served)"
    )
    classes: list[str] = Field(description="Class names, from sub-folder names for own galleries")
    default: bool = Field(description="Jobs that name no gallery search this one")
    updated_at: datetime | None = Field(None, description="When a live gallery last changed")


class Item(BaseModel):
    """An item of a gallery."""

    id: str
    gallery: str
    state: str = Field(description="indexed, or pending: an add of it is not done yet")
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_url: str | None = Field(None, description="The item's image (None until indexed)")
    sha256: str | None = Field(None, description="Of the uploaded bytes (live galleries)")
    added_at: datetime | None = None
    pending_job: str | None = Field(None, description="The job of an add not done yet")


class ItemPage(BaseModel):
    items: list[Item]
    total: int
    next: str | None = Field(None, description="Pass as ?after= for the next page")


class Galleries(BaseModel):
    default: str
    galleries: list[GallerySummary]


def gallery_image_url(gallery: str, index: int) -> str:
    """Where the API serves gallery image ``index`` of ``gallery``."""
    return f"/gallery/{index}.png?gallery={gallery}"


class Timings(BaseModel):
    queue_wait_ms: float = Field(description="From acceptance to a worker starting the job")
    decode_ms: float = Field(description="Decoding the upload in the worker")
    embed_ms: float = Field(description="Preprocessing and the CLIP forward pass")
    search_ms: float = Field(description="Matrix product and top-k over the gallery")
    total_ms: float = Field(description="From acceptance to the result being stored")


class JobResult(BaseModel):
    matches: list[Match] = Field(default_factory=list)
    item: ItemAdded | None = Field(None, description="An add job: what it did")
    duplicates: Duplicates | None = Field(None, description="A duplicates job: the pairs")
    model: str = Field(description="The CLIP checkpoint that embedded the query")
    model_is_random: bool = Field(
        description="True when the opt-in random model answered: matches are meaningless"
    )
    gallery: GalleryInfo
    device: str
    worker: str
    batch_size: int = Field(1, description="Jobs embedded in the same forward pass")
    timings: Timings


class Job(BaseModel):
    """A job as stored and as returned by ``GET /jobs/<id>``."""

    id: str
    status: JobStatus
    kind: JobKind = Field(JobKind.IMAGE, description="image, text, item, add or duplicates")
    text: str | None = Field(None, description="The text query of a text job")
    gallery: str = Field(FASHION_MNIST, description="The gallery searched")
    k: int
    item_id: str | None = Field(None, description="The item searched like, or added")
    filter: dict[str, Any] | None = Field(None, description="Attribute conditions a match meets")
    min_score: float | None = Field(None, description="No match scores below this")
    exclude: list[str] = Field(default_factory=list, description="Item ids never returned")
    stage: JobStage | None = Field(None, description="While running: what the worker is doing")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(0, description="How many times a worker started this job")
    error: str | None = Field(None, description="Why the job failed, when it did")
    result: JobResult | None = None


class Problem(BaseModel):
    """FastAPI's error shape."""

    detail: str
