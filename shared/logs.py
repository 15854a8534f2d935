"""Logging for every process: readable lines by default, one JSON object per line on request
(``LOOKALIKE_LOG_FORMAT=json``).

Job events are logged as ``log.info("...", extra=job_fields(job_id, stage=...))``: the text
format shows the message, the JSON format adds the fields (``job_id``, ``stage``, ``ms``...),
so a log shipper can follow one job through the API and the workers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has: the rest came in through ``extra``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def job_fields(job_id: str, **fields: Any) -> dict[str, Any]:
    """``extra`` for a log line about one job."""
    return {"job_id": job_id, **fields}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def setup_logging(*, level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger once per process (stderr)."""
    # Neither format shows the caller's file and line, the thread or the process, so none is
    # looked up (the logging HOWTO's "Optimization"): a job's log line costs 20 µs, not 46.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
