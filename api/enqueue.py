"""Celery task messages for jobs, made without sending them.

A job's task message is written to its queue by the same Redis script that stores the job
(shared.jobs.AsyncJobStore.submit): the queue-length check, the job record, its pixels and its
message are one atomic step and one round trip, and a job is never stored without its message
or queued without its record.

The message is exactly what ``Celery.send_task`` puts in the Redis list: Celery builds the
task's headers and body (``app.amqp.as_task_v2``, protocol 2), kombu serialises the body and
wraps it as its Redis transport does (tests/api/test_enqueue.py compares the two, field by
field, against the pinned Celery and kombu). Sending through Celery instead cost a thread
hand-off (its producer blocks), a look-up of the queue's bindings and a push: two more round
trips per job, and about 0.6 ms of the API's CPU per job (docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from kombu.serialization import dumps as serialise
from kombu.utils.json import dumps as envelope

from shared.celery_config import SEARCH_TASK


class TaskMessages:
    def __init__(self, celery: Any) -> None:
        self.celery = celery
        self._reply_to = str(uuid.uuid4())  # Celery's per-app "oid" plays this part

    def search(self, job_id: str, *, queue: str) -> bytes:
        """The message of the search task for ``job_id`` (task id = job id) on ``queue``."""
        message = self.celery.amqp.as_task_v2(
            job_id, SEARCH_TASK, args=[job_id], kwargs={}, reply_to=self._reply_to
        )
        content_type, content_encoding, body = serialise(message.body, serializer="json")
        raw = body.encode() if isinstance(body, str) else body
        return str(
            envelope(
                {
                    "body": base64.b64encode(raw).decode(),
                    "content-encoding": content_encoding,
                    "content-type": content_type,
                    "headers": message.headers,
                    "properties": {
                        **message.properties,
                        "delivery_mode": 2,
                        "delivery_info": {"exchange": "", "routing_key": queue},
                        "priority": 0,
                        "body_encoding": "base64",
                        "delivery_tag": str(uuid.uuid4()),
                    },
                }
            )
        ).encode()
