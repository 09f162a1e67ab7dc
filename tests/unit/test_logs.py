"""Structured worker logs (mudsc_jobs.logs): every line names the job and attempt, in every thread."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from mudsc_jobs import logs


@pytest.fixture()
def json_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test.mudsc.logs")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    logs.install(logger, "json")
    yield logger, stream
    logs.clear()
    logger.handlers = []


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_every_line_is_one_json_object_with_job_and_attempt(json_lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_lines
    logger.info("before any job")
    logs.bind(job_id="job-1", attempt=None)
    logger.info("claiming %s", "job-1")
    logs.bind(attempt=2)
    logger.warning("merging", extra={"stage": "merging"})
    worker = threading.Thread(target=lambda: logger.info("from a transfer thread"))
    worker.start()
    worker.join()
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    logs.clear()
    logger.info("after the job")

    entries = lines(stream)
    assert [(e["job_id"], e["attempt"]) for e in entries] == [
        (None, None),
        ("job-1", None),
        ("job-1", 2),
        ("job-1", 2),
        ("job-1", 2),
        (None, None),
    ]
    assert entries[1]["message"] == "claiming job-1" and entries[1]["level"] == "INFO"
    assert entries[2]["stage"] == "merging" and entries[2]["logger"] == "test.mudsc.logs"
    assert entries[3]["thread"] != entries[2]["thread"]
    assert "ValueError: boom" in str(entries[4]["exception"])
    assert all(str(e["ts"]).endswith("+00:00") and isinstance(e["pid"], int) for e in entries)


def test_text_format_keeps_the_formatter_and_adds_the_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(job_id)s/%(attempt)s %(message)s"))
    logger = logging.getLogger("test.mudsc.logs.text")
    logger.handlers, logger.propagate = [handler], False
    logs.install(logger, "text")
    logs.install(logger, "text")  # idempotent: one filter
    assert len(handler.filters) == 1
    logs.bind(job_id="j", attempt=1)
    try:
        logger.warning("hello")
    finally:
        logs.clear()
    assert stream.getvalue() == "j/1 hello\n"


def test_the_worker_setting_switches_json_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from mudsc_jobs.settings import Settings

    monkeypatch.setenv("MUDSC_WORKER__LOG_FORMAT", "json")
    assert Settings().worker.log_format == "json"
    monkeypatch.setenv("MUDSC_WORKER__LOG_FORMAT", "xml")
    with pytest.raises(ValueError):
        Settings()
