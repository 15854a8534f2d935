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
trips per job, and about 0.6 ms of the API's CPU per job (docs/benchmarks.md). Celery builds
one message per queue here, once; each job's is that one with its id, body and delivery tag
filled in: 8 µs a message instead of 66 (the 2-core development machine).
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

from kombu.serialization import dumps as serialise
from kombu.utils.json import dumps as envelope

from shared.celery_config import SEARCH_TASK

# Stand-ins in a queue's message, replaced per job: none is hexadecimal, as job ids and uuids
# are, so filling one in cannot make another.
_JOB_ID = "lookalikeJOBlookalike"
_TAG = "lookalikeTAGlookalike"
_BODY = "lookalikeBODYlookalike"


class TaskMessages:
    def __init__(self, celery: Any) -> None:
        self.celery = celery
        self._reply_to = str(uuid.uuid4())  # Celery's per-app "oid" plays this part
        self._templates: dict[str, tuple[str, str]] = {}

    def search(self, job_id: str, *, queue: str) -> bytes:
        """The message of the search task for ``job_id`` (task id = job id) on ``queue``."""
        template = self._templates.get(queue)
        if template is None:
            template = self._templates[queue] = self._template(queue)
        message, body = template
        encoded = base64.b64encode(body.replace(_JOB_ID, job_id).encode()).decode()
        return (
            message.replace(_JOB_ID, job_id)
            .replace(_TAG, str(uuid.uuid4()))
            .replace(_BODY, encoded)
            .encode()
        )

    def _template(self, queue: str) -> tuple[str, str]:
        """The message on ``queue`` and its body (JSON), for the job id ``_JOB_ID``."""
        message = self.celery.amqp.as_task_v2(
            _JOB_ID, SEARCH_TASK, args=[_JOB_ID], kwargs={}, reply_to=self._reply_to
        )
        content_type, content_encoding, body = serialise(message.body, serializer="json")
        text = body.decode() if isinstance(body, bytes) else body
        wrapped = envelope(
            {
                "body": _BODY,
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": message.headers,
                "properties": {
                    **message.properties,
                    "delivery_mode": 2,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": _TAG,
                },
            }
        )
        return str(wrapped), text
