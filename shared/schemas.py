"""The shapes that travel between the API, Redis and the worker."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field

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
    IMAGE = "image"
    TEXT = "text"


class JobStage(StrEnum):
    """Where a running job is. The API decoded the upload when it accepted it, so a worker
    starts a job embedding it (the search that follows takes well under a millisecond, the
    result is stored at once). ``decoding`` is only seen in records of earlier versions."""

    EMBEDDING = "embedding"
    DECODING = "decoding"


class Match(BaseModel):
    rank: int = Field(description="1 for the closest match")
    index: int = Field(description="Position of the image in the gallery")
    label: int = Field(description="Class number of the gallery image")
    label_name: str = Field(description="Class name, e.g. 'Sneaker'")
    score: float = Field(ge=-1.0, le=1.0, description="Cosine similarity")
    image_url: str = Field("", description="The gallery image, as a PNG (add &size=N to scale)")
    path: str | None = Field(
        None, description="The image's file, relative to its folder (own galleries only)"
    )


class GalleryInfo(BaseModel):
    name: str
    size: int


class GallerySummary(BaseModel):
    """A gallery some ready worker can search."""

    name: str
    size: int = Field(description="Images in the gallery")
    model: str = Field(description="The CLIP checkpoint its index was built with")
    kind: str = Field(description="fashion-mnist, or folder for a gallery of your own images")
    classes: list[str] = Field(description="Class names, from sub-folder names for own galleries")
    default: bool = Field(description="Jobs that name no gallery search this one")


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
    matches: list[Match]
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
    kind: JobKind = Field(JobKind.IMAGE, description="image: an upload; text: a text query")
    text: str | None = Field(None, description="The text query of a text job")
    gallery: str = Field(FASHION_MNIST, description="The gallery searched")
    k: int
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
