"""A merge pool process's warm-up (worker/context.py): its S3 round trip through the job's transfer code
leaves nothing behind in the results bucket."""

from __future__ import annotations

from typing import Any

import pytest


def test_the_warm_up_s3_round_trip_leaves_nothing_behind(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in stack.settings_env().items():
        monkeypatch.setenv(name, value)
    from worker import context

    context.reset()
    try:
        ctx = context.get()
        context._warm_transfers(ctx)
        listing = stack.s3_client().list_objects_v2(Bucket=ctx.settings.s3.results_bucket, Prefix=".warm-up/")
        assert listing.get("KeyCount", 0) == 0, listing.get("Contents")
    finally:
        context.reset()
