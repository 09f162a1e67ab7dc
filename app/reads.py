"""The fast path of ``GET /v1/merges/{id}``, the most frequent request (clients poll it).

Pure ASGI, inside the metrics middleware: a well-formed job id with a valid bearer key (``KeyRing.lookup``,
cached per verified key) is read on the event loop (``redis.asyncio``: no thread-pool hop) with one script
call that returns the job's hash as one JSON string (one bulk reply to parse instead of two per field), and
answered with the JSON of the route's response model, rendered once per version of the record: a snapshot
equal to the last one read reuses its bytes. The answer is byte for byte the route's (``get_merge``: same
body, same headers), without FastAPI's dependency solving, routing and response validation on every read.

Everything else, and every read that would not answer 200 (no or an invalid key, an unknown or another
tenant's job, Redis failing), goes on to the application unchanged, so that its errors stay the route's
problem+json answers (the store's reconnect retries included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from redis.commands.core import AsyncScript

from app.auth import bearer_key
from app.routes import get_merge, v1
from mudsc_jobs.store import Keys, decode_job

logger = logging.getLogger(__name__)

_PATH = re.compile(r"^/v1/merges/(mrg_[0-9A-HJKMNP-TV-Z]{26})$")
_MAX_CACHED_BYTES = 256 * 1024  # a larger job (thousands of artifacts) is rendered on every read
_HEADERS_FOR = [(b"content-type", b"application/json")]
# The job's hash as one JSON string (a flat [field, value, ...] list), false when missing: one bulk reply to
# parse instead of two per field, and a string to compare with the last one read.
_SNAPSHOT = "local h = redis.call('HGETALL', KEYS[1]) if #h == 0 then return false end return cjson.encode(h)"


class JobReader:
    """The fast path's state (one per application): the rendered records, the asyncio Redis client."""

    def __init__(self, api: FastAPI, cache_size: int = 1024) -> None:
        self.api = api
        self.cache_size = cache_size
        # job id -> (the snapshot last read, its tenant, its rendered JSON); FIFO-bounded
        self._rendered: dict[str, tuple[str, str, bytes]] = {}
        self._keys = Keys(api.state.settings.redis.key_prefix)
        self._route: APIRoute | None = None
        self._client: aioredis.Redis | None = None
        self._script: AsyncScript | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def route(self) -> APIRoute:
        if self._route is None:
            # the router's own route object: what FastAPI puts in scope["route"] for this request
            self._route = next(r for r in v1.routes if isinstance(r, APIRoute) and r.endpoint is get_merge)
        return self._route

    def snapshot_script(self) -> AsyncScript:
        """This event loop's script (an asyncio connection belongs to the loop that opened it)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._script is None or self._loop is not loop:
            settings = self.api.state.settings
            self._client = aioredis.Redis.from_url(
                settings.redis.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
            )
            self._script = self._client.register_script(_SNAPSHOT)
            self._loop = loop
        return self._script

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = None

    def render(self, job_id: str, snapshot: str) -> tuple[str, bytes] | None:
        """(the job's tenant, its JSON) from its snapshot; None for a record without status (being removed)."""
        cached = self._rendered.get(job_id)
        if cached is not None and cached[0] == snapshot:
            return cached[1], cached[2]
        flat = json.loads(snapshot)
        raw = dict(zip(flat[::2], flat[1::2]))
        if "status" not in raw or "tenant" not in raw:
            return None
        field = self.route().response_field
        assert field is not None
        value, errors = field.validate(decode_job(raw), {}, loc=("response",))
        if errors:
            raise ValueError(f"job {job_id} does not validate as its response model")
        body = field.serialize_json(value)
        if len(body) <= _MAX_CACHED_BYTES:
            if len(self._rendered) >= self.cache_size:
                self._rendered.pop(next(iter(self._rendered)), None)
            self._rendered[job_id] = (snapshot, raw["tenant"], body)
        return raw["tenant"], body

    async def answer(self, scope: dict[str, Any]) -> bytes | None:
        """The body of a 200 for this request, or None: the application answers it."""
        match = _PATH.match(scope["path"])
        if match is None:
            return None
        presented = bearer_key(_header(scope, b"authorization"))
        if presented is None:
            return None
        tenant = self.api.state.keyring.lookup(presented)
        if tenant is None:
            return None
        job_id = match.group(1)
        try:
            snapshot = await self.snapshot_script()(keys=[self._keys.job(job_id)])
            if not snapshot:
                return None
            rendered = self.render(job_id, snapshot)
            if rendered is None or rendered[0] != tenant.name:
                return None
            return rendered[1]
        except Exception as exc:  # noqa: BLE001 - Redis errors, an odd record: the route answers (its problem)
            logger.debug("fast job read of %s fell back to the route: %r", job_id, exc)
            return None


class JobReads:
    """ASGI middleware: answers the 200s of ``GET /v1/merges/{id}`` itself (module docstring)."""

    def __init__(self, app: Any, reader: JobReader) -> None:
        self.app = app
        self.reader = reader

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith("/v1/merges/mrg_"):
            await self.app(scope, receive, send)
            return
        body = await self.reader.answer(scope)
        if body is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.reader.route()  # the metrics label the request by its route template
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()), *_HEADERS_FOR],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    """The first value of a header (as ``Request.headers.get`` reads it: latin-1)."""
    for key, value in scope["headers"]:
        if key == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None
