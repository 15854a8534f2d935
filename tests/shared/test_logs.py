"""JSON log lines and the root logger's setup, on in-memory streams."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from shared.logs import JsonFormatter, job_fields, setup_logging

JOB_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def json_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own whose lines go through JsonFormatter into a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lookalike.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def restored_root() -> Iterator[logging.Logger]:
    """The root logger, given back with its handlers and level as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    lookups = {name: getattr(logging, name) for name in _LOOKUPS}
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, value in lookups.items():
        setattr(logging, name, value)


_LOOKUPS = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_json_line_has_time_level_logger_and_message(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_logger

    logger.warning("queue is %d long", 12)

    [payload] = lines(stream)
    assert set(payload) == {"time", "level", "logger", "message"}
    assert (payload["level"], payload["logger"]) == ("WARNING", "lookalike.test-logs")
    assert payload["message"] == "queue is 12 long"
    moment = datetime.fromisoformat(payload["time"])
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", payload["time"])


def test_json_line_carries_job_fields(json_logger: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_logger

    logger.info("job %s: embedded", JOB_ID, extra=job_fields(JOB_ID, stage="embed", ms=12.5))

    [payload] = lines(stream)
    assert payload["message"] == f"job {JOB_ID}: embedded"
    assert (payload["job_id"], payload["stage"], payload["ms"]) == (JOB_ID, "embed", 12.5)
    assert "args" not in payload and "msg" not in payload  # LogRecord's own attributes stay out


def test_job_fields_puts_the_job_id_first() -> None:
    assert job_fields(JOB_ID, stage="end", status="failed") == {
        "job_id": JOB_ID,
        "stage": "end",
        "status": "failed",
    }
    assert job_fields(JOB_ID) == {"job_id": JOB_ID}


def test_json_line_writes_values_json_cannot_as_text(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_logger

    logger.info("built", extra={"folder": Path("/data/shoes"), "classes": ("a", "b")})

    [payload] = lines(stream)
    assert payload["folder"] == "/data/shoes"
    assert payload["classes"] == ["a", "b"]


def test_json_line_includes_the_exception(json_logger: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_logger

    try:
        raise RuntimeError("CUDA error: out of memory")
    except RuntimeError:
        logger.exception("job %s: embedding failed", JOB_ID, extra=job_fields(JOB_ID))

    [payload] = lines(stream)
    assert payload["level"] == "ERROR"
    assert payload["job_id"] == JOB_ID
    assert payload["exception"].startswith("Traceback (most recent call last):")
    assert payload["exception"].endswith("RuntimeError: CUDA error: out of memory")


def test_json_line_of_a_multiline_message_is_one_line(
    json_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_logger

    logger.info('two\nlines with "quotes"')

    assert stream.getvalue().count("\n") == 1
    assert lines(stream)[0]["message"] == 'two\nlines with "quotes"'


def test_setup_logging_json_replaces_the_root_handlers(
    restored_root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    stray = logging.StreamHandler(io.StringIO())
    restored_root.addHandler(stray)

    setup_logging(level="WARNING", fmt="json")
    logging.getLogger("lookalike.test-setup").warning("hello", extra=job_fields(JOB_ID))
    logging.getLogger("lookalike.test-setup").info("below the level")

    [handler] = restored_root.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert restored_root.level == logging.WARNING
    [line] = capsys.readouterr().err.splitlines()
    payload = json.loads(line)
    assert (payload["message"], payload["job_id"]) == ("hello", JOB_ID)
    assert isinstance(stray.stream, io.StringIO) and stray.stream.getvalue() == ""


def test_setup_logging_twice_keeps_one_handler(restored_root: logging.Logger) -> None:
    setup_logging(fmt="json")
    setup_logging(fmt="json")

    assert len(restored_root.handlers) == 1


def test_setup_logging_text_writes_readable_lines(
    restored_root: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(fmt="text")

    logging.getLogger("lookalike.test-setup").info("job %s: started", JOB_ID)

    [handler] = restored_root.handlers
    assert not isinstance(handler.formatter, JsonFormatter)
    [line] = capsys.readouterr().err.splitlines()
    assert line.endswith(f" INFO lookalike.test-setup: job {JOB_ID}: started")
