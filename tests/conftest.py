"""Shared fixtures. The local stack (Redis, SeaweedFS S3, a Celery worker, the API) starts lazily, once per
session, only when a test asks for ``stack``: unit tests (tests/unit) run without it.

A stack that cannot start is an error with the failing component's log tail, never a skip.
Set ``MUDSC_TEST_STACK=.stack`` to run the tests against a stack started with ``make up`` instead
(it is left running).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mudsc_client.client import MudscClient
    from scripts.localstack import LocalStack


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so that the marker exists whatever ini file is used.
    config.addinivalue_line("markers", "integration: needs real Redis, S3 server and Celery worker processes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the stack, or lives in tests/integration, is an integration test."""
    for item in items:
        in_integration = "integration" in Path(str(item.fspath)).parts
        if in_integration or "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    from scripts.localstack import LocalStack, StackError

    existing = os.environ.get("MUDSC_TEST_STACK")
    if existing:
        try:
            yield LocalStack.attach(existing)
        except StackError as exc:
            pytest.fail(f"MUDSC_TEST_STACK={existing}: {exc}", pytrace=False)
        return
    local = LocalStack(tmp_path_factory.mktemp("stack"))
    try:
        local.start()
    except StackError as exc:
        pytest.fail(f"the local stack failed to start: {exc}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def stack_client(stack: LocalStack) -> Iterator[MudscClient]:
    """API client of tenant ``demo`` (allowed: every bucket)."""
    from mudsc_client.client import MudscClient

    with MudscClient(stack.api_url, stack.api_key) as client:
        yield client


@pytest.fixture(scope="session")
def other_client(stack: LocalStack) -> Iterator[MudscClient]:
    """API client of tenant ``other`` (allowed: only ``s3://<bucket>/other/`` prefixes)."""
    from mudsc_client.client import MudscClient

    with MudscClient(stack.api_url, stack.other_api_key) as client:
        yield client


@pytest.fixture(scope="session")
def s3(stack: LocalStack) -> Any:
    """A boto3 S3 client of the stack's SeaweedFS (path-style addressing)."""
    return stack.s3_client()
