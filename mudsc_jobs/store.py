"""The job store in Redis, shared by the API and the worker.

Layout (every key starts with ``settings.redis.key_prefix``):

- ``job:{id}``               hash: the job record (JSON-encoded values for nested fields)
- ``job:{id}:events``        stream: the job's events (``XADD`` ids are the event ids)
- ``tenant:{t}:jobs``        sorted set: the tenant's jobs by creation time (newest-first listing)
- ``tenant:{t}:active``      set: the tenant's queued/running jobs (concurrency limit)
- ``idem:{t}:{sha256(key)}`` string: ``{job id} {body hash}`` for ``Idempotency-Key``

Every state change is one Lua script that checks the current status (and, for the worker,
the attempt number), writes the record and appends the event, so a transition and its event
are never separated, a terminal state never changes, and a stale attempt cannot overwrite a
newer one. Lease expiry is judged by the Redis server clock (``TIME``), not by worker clocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from mudsc_jobs.webhook_store import WebhookStore

if TYPE_CHECKING:
    from mudsc_jobs.settings import Settings

JobStatus = Literal["queued", "running", "canceling", "succeeded", "failed", "canceled"]
TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "canceled")
ACTIVE: tuple[JobStatus, ...] = ("queued", "running", "canceling")
STATUSES: tuple[JobStatus, ...] = ACTIVE + TERMINAL
EVENTS_MAXLEN = 10_000
LAST_STREAM_ID = f"{2**64 - 1}-{2**64 - 1}"

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_ULID_LOCK = threading.Lock()
_last_ulid = [0, 0]  # (ms, random part) of this process's last id


def new_job_id() -> str:
    """``mrg_`` + a ULID (48-bit millisecond time + 80 random bits, Crockford base32): sortable, unguessable.

    Monotonic within a process (ULID spec): ids made in the same millisecond increment the random part, so
    the tenant index (scored by millisecond, ties ordered by id) lists them in creation order.
    """
    ms, rand = int(time.time() * 1000), int.from_bytes(os.urandom(10), "big")
    with _ULID_LOCK:
        if ms <= _last_ulid[0] and _last_ulid[1] < (1 << 80) - 1:
            ms, rand = _last_ulid[0], _last_ulid[1] + 1
        _last_ulid[0], _last_ulid[1] = ms, rand
    value = (ms << 80) | rand
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "mrg_" + "".join(reversed(chars))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# ------------------------------------------------------------------------------------ Lua
# Shared helpers prepended to every script. ``now_ms`` uses the server clock.
_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_terminal(s) return s == 'succeeded' or s == 'failed' or s == 'canceled' end
local function in_list(csv, s) return string.find(',' .. csv .. ',', ',' .. s .. ',', 1, true) ~= nil end
local function add_event(key, event) return redis.call('XADD', key, 'MAXLEN', '~', @EVENTS_MAXLEN@, '*', 'e', event) end
-- A job with a webhook whose events name its terminal status gets its delivery recorded as pending in the same
-- step as the status (key layout: Keys.webhook / Keys.webhooks_pending), so that no event is lost if the writer
-- dies before it sends the delivery task: the reconciler sends every overdue pending delivery.
local function queue_webhook(job, id, ttl)
  local hook = redis.call('HGET', job, 'webhook')
  if not hook or hook == '' then return end
  local status = redis.call('HGET', job, 'status')
  local conf = cjson.decode(hook)
  local wanted = false
  for _, event in ipairs(conf['events'] or {}) do if event == status then wanted = true end end
  local delivery = job .. ':webhook'
  if not wanted or redis.call('EXISTS', delivery) == 1 then return end
  local now = now_ms()
  redis.call('HSET', delivery, 'job_id', id, 'webhook_id', 'msg_' .. id .. '_' .. status, 'type', 'merge.' .. status,
    'url', conf['url'], 'status', 'pending', 'created_ms', now, 'attempts', 0, 'next_attempt_ms', now)
  redis.call('EXPIRE', delivery, ttl)
  redis.call('ZADD', string.sub(job, 1, #job - #id - 4) .. 'webhooks:pending', now, id)
end
local function finish(job, events, active, id, ttl)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
  redis.call('SREM', active, id)
  queue_webhook(job, id, ttl)
end
-- The two ways a job whose worker is gone ends (used by claim and by the reconciler).
local function end_canceled(job, events, active, id, attempt, now_iso, ttl)
  redis.call('HSET', job, 'status', 'canceled', 'finished_at', now_iso, 'updated_at', now_iso)
  add_event(events, cjson.encode({type='status', time=now_iso, data={status='canceled', attempt=attempt}}))
  finish(job, events, active, id, ttl)
end
local function end_worker_lost(job, events, active, id, attempt, max_attempts, stage, now_iso, ttl)
  local err = {code='worker_lost', message='the worker running attempt ' .. attempt ..
    ' was lost (lease expired) and the job reached its maximum of ' .. max_attempts .. ' attempts', retryable=true}
  if stage then err['stage'] = stage end
  redis.call('HSET', job, 'status', 'failed', 'error', cjson.encode(err), 'finished_at', now_iso, 'updated_at', now_iso)
  add_event(events, cjson.encode({type='status', time=now_iso, data={status='failed', attempt=attempt, error=err}}))
  finish(job, events, active, id, ttl)
end
""".replace("@EVENTS_MAXLEN@", str(EVENTS_MAXLEN))

# One atomic decision per submission: an idempotent replay returns the original job; else the tenant's
# limit, then the explicit output prefix (reserved for the job's TTL), then the job is created.
# KEYS: job, events, index, active, idem, output
# ARGV: id, score, max_active, use_idem, body_hash, ttl, event, job key prefix, use_output, field/value pairs...
_LUA_CREATE = (
    _LUA_COMMON
    + """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then
    local sep = string.find(existing, ' ', 1, true)
    local old_id = string.sub(existing, 1, sep - 1)
    local old_hash = string.sub(existing, sep + 1)
    if redis.call('EXISTS', ARGV[8] .. old_id) == 1 then
      if old_hash == ARGV[5] then return {'existing', old_id} end
      return {'conflict', old_id}
    end
  end
end
if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[3]) then return {'limit', ''} end
if ARGV[9] == '1' and not redis.call('SET', KEYS[6], ARGV[1], 'NX', 'EX', ARGV[6]) then
  return {'output_taken', redis.call('GET', KEYS[6]) or ''}
end
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
if ARGV[4] == '1' then redis.call('SET', KEYS[5], ARGV[1] .. ' ' .. ARGV[5], 'EX', ARGV[6]) end
add_event(KEYS[2], ARGV[7])
return {'created', ARGV[1]}
"""
)

# KEYS: job, events, active
# ARGV: allowed_from (csv), expected_attempt ('' = any), new_status ('' = keep), ttl, event ('' = none), pairs...
_LUA_TRANSITION = (
    _LUA_COMMON
    + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'missing', ''} end
if not in_list(ARGV[1], cur) then return {'conflict', cur} end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then return {'stale', cur} end
if #ARGV > 5 then
  local fields = {}
  for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[1], unpack(fields))
end
local new = cur
if ARGV[3] ~= '' then new = ARGV[3]; redis.call('HSET', KEYS[1], 'status', new) end
if ARGV[5] ~= '' then add_event(KEYS[2], ARGV[5]) end
if is_terminal(new) then finish(KEYS[1], KEYS[2], KEYS[3], redis.call('HGET', KEYS[1], 'id'), ARGV[4]) end
return {'ok', new}
"""
)

# KEYS: job, events, active
# ARGV: owner, lease_ttl_ms, max_attempts, now_iso, ttl
_LUA_CLAIM = (
    _LUA_COMMON
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'lease_until_ms', 'id', 'progress')
local status, attempt, lease_until, id = h[1], tonumber(h[2]), tonumber(h[3]) or 0, h[4]
if not status then return {'missing', '0'} end
if is_terminal(status) then return {'terminal', tostring(attempt), status} end
local now = now_ms()
if (status == 'running' or status == 'canceling') then
  if lease_until > now then return {'leased', tostring(attempt), status, tostring(lease_until - now)} end
  -- the previous attempt's worker is gone
  local stage = nil
  if h[5] and h[5] ~= '' then stage = cjson.decode(h[5])['stage'] end
  if status == 'canceling' or redis.call('HGET', KEYS[1], 'cancel') == '1' then
    end_canceled(KEYS[1], KEYS[2], KEYS[3], id, attempt, ARGV[4], ARGV[5])
    return {'terminal', tostring(attempt), 'canceled'}
  end
  if attempt >= tonumber(ARGV[3]) then
    end_worker_lost(KEYS[1], KEYS[2], KEYS[3], id, attempt, ARGV[3], stage, ARGV[4], ARGV[5])
    return {'terminal', tostring(attempt), 'failed'}
  end
end
if status ~= 'queued' and status ~= 'running' then return {'conflict', tostring(attempt), status} end
attempt = attempt + 1
redis.call('HSET', KEYS[1], 'status', 'running', 'attempt', attempt, 'lease_owner', ARGV[1],
           'lease_until_ms', now + tonumber(ARGV[2]), 'updated_at', ARGV[4], 'progress', '')
if redis.call('HGET', KEYS[1], 'started_at') == '' then redis.call('HSET', KEYS[1], 'started_at', ARGV[4]) end
add_event(KEYS[2], cjson.encode({type='status', time=ARGV[4], data={status='running', attempt=attempt}}))
return {'claimed', tostring(attempt), 'running'}
"""
)

# KEYS: job, events
# ARGV: attempt, lease_ttl_ms, progress ('' = lease renewal only), event, now_iso
_LUA_HEARTBEAT = (
    _LUA_COMMON
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not h[1] then return {'missing', ''} end
if h[2] ~= ARGV[1] then return {'stale', h[1]} end
if h[1] ~= 'running' and h[1] ~= 'canceling' then return {'conflict', h[1]} end
redis.call('HSET', KEYS[1], 'lease_until_ms', now_ms() + tonumber(ARGV[2]))
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[3], 'updated_at', ARGV[5])
  add_event(KEYS[2], ARGV[4])
end
return {'ok', h[1]}
"""
)

# The reconciler's step for one job whose worker may be gone. KEYS: job, events, active
# ARGV: max_attempts, now_iso, ttl
# running|canceling with an expired lease: canceling (or cancel requested) -> canceled; attempts used up ->
# failed `worker_lost`; else -> queued again (same attempt number: the next claim makes it attempt + 1; the
# lost worker's heartbeat and completion are then refused, since status and attempt no longer match).
_LUA_REAP = (
    _LUA_COMMON
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'lease_until_ms', 'id', 'progress', 'cancel')
local status, attempt, lease_until, id = h[1], tonumber(h[2]), tonumber(h[3]) or 0, h[4]
if not status then return {'missing', ''} end
if status ~= 'running' and status ~= 'canceling' then return {'skip', status} end
if lease_until > now_ms() then return {'live', status} end
local stage = nil
if h[5] and h[5] ~= '' then stage = cjson.decode(h[5])['stage'] end
if status == 'canceling' or h[6] == '1' then
  end_canceled(KEYS[1], KEYS[2], KEYS[3], id, attempt, ARGV[2], ARGV[3])
  return {'canceled', 'canceled'}
end
if attempt >= tonumber(ARGV[1]) then
  end_worker_lost(KEYS[1], KEYS[2], KEYS[3], id, attempt, ARGV[1], stage, ARGV[2], ARGV[3])
  return {'failed', 'failed'}
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'lease_owner', '', 'lease_until_ms', '0', 'updated_at', ARGV[2])
add_event(KEYS[2], cjson.encode({type='status', time=ARGV[2],
  data={status='queued', attempt=attempt, reason='lease_expired'}}))
return {'requeued', 'queued'}
"""
)


# KEYS: job, events; ARGV: attempt, event. A stale attempt's log line is refused like its heartbeat.
_LUA_LOG = (
    _LUA_COMMON
    + """
local h = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not h[1] then return {'missing', ''} end
if h[2] ~= ARGV[1] then return {'stale', h[1]} end
if h[1] ~= 'running' and h[1] ~= 'canceling' then return {'conflict', h[1]} end
add_event(KEYS[2], ARGV[2])
return {'ok', h[1]}
"""
)

# KEYS: output; ARGV: job id. Compare-and-delete: a reservation taken over by another job is left alone.
_LUA_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# ------------------------------------------------------------------------------------ API
class StoreError(Exception):
    """Base of job-store outcomes the callers map to HTTP answers or task decisions."""


class JobNotFound(StoreError):
    pass


class TransitionConflict(StoreError):
    def __init__(self, status: str) -> None:
        super().__init__(f"job is {status}")
        self.status = status


class StaleAttempt(StoreError):
    """The caller's attempt is no longer the job's current attempt."""


class TenantLimitReached(StoreError):
    pass


class IdempotencyConflict(StoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class OutputTaken(StoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class CursorNotFound(StoreError):
    pass


@dataclass(frozen=True)
class Claim:
    outcome: str  # claimed | leased | terminal | missing | conflict
    attempt: int
    status: str | None
    lease_remaining_s: float = 0.0


_JSON_FIELDS = ("spec", "labels", "progress", "error", "result")
_NULLABLE = ("started_at", "finished_at")


def decode_job(raw: dict[str, str]) -> dict[str, Any]:
    """The Redis hash -> the public job dict (docs/design/API.md, the job object)."""
    job: dict[str, Any] = {
        "id": raw["id"],
        "status": raw["status"],
        "created_at": raw["created_at"],
        "started_at": raw.get("started_at") or None,
        "finished_at": raw.get("finished_at") or None,
        "attempt": int(raw.get("attempt") or 0),
        "cancel_requested": raw.get("cancel") == "1",
    }
    for name in _JSON_FIELDS:
        value = raw.get(name) or ""
        job[name] = json.loads(value) if value else None
    job["labels"] = job["labels"] or {}
    job["tenant"] = raw["tenant"]
    return job


def event_payload(event_type: str, data: dict[str, Any], at: str | None = None) -> str:
    return _json({"type": event_type, "time": at or utcnow(), "data": data})


def decode_event(event_id: str, fields: dict[str, str]) -> dict[str, Any]:
    body = json.loads(fields["e"])
    return {"id": event_id, "time": body["time"], "type": body["type"], "data": body["data"]}


def _raise_for(outcome: str, status: str, job_id: str) -> None:
    """Map a transition script's refusal to its exception."""
    if outcome == "missing":
        raise JobNotFound(job_id)
    if outcome == "stale":
        raise StaleAttempt(job_id)
    if outcome == "conflict":
        raise TransitionConflict(status)


@dataclass(frozen=True)
class Keys:
    """The store's key layout (see the module docstring); every key starts with ``prefix``."""

    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:events"

    def index(self, tenant: str) -> str:
        return f"{self.prefix}tenant:{tenant}:jobs"

    def active(self, tenant: str) -> str:
        return f"{self.prefix}tenant:{tenant}:active"

    def idem(self, tenant: str, key: str) -> str:
        return f"{self.prefix}idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    def output(self, uri: str) -> str:
        return f"{self.prefix}output:{hashlib.sha256(uri.encode()).hexdigest()}"

    # webhook deliveries (mudsc_jobs/webhook_store.py; the terminal-status scripts' queue_webhook writes the first two)
    def webhook(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:webhook"

    def webhooks_pending(self) -> str:
        return f"{self.prefix}webhooks:pending"

    def webhook_attempts(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:webhook:attempts"


class JobStore:
    """Synchronous store used by the API (in its thread pool) and by the worker."""

    def __init__(self, client: redis.Redis, *, prefix: str, job_ttl_s: int) -> None:
        self.redis = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.job_ttl_s = job_ttl_s
        self._create = client.register_script(_LUA_CREATE)
        self._transition = client.register_script(_LUA_TRANSITION)
        self._claim = client.register_script(_LUA_CLAIM)
        self._heartbeat = client.register_script(_LUA_HEARTBEAT)
        self._reap = client.register_script(_LUA_REAP)
        self._release = client.register_script(_LUA_RELEASE)
        self._log = client.register_script(_LUA_LOG)
        self.webhooks = WebhookStore(client, self.keys, job_ttl_s)

    @classmethod
    def from_url(cls, url: str, *, prefix: str, job_ttl_s: int, timeout_s: float = 5.0) -> JobStore:
        # Reconnect with backoff across a Redis restart (about 10 s in all) before an error reaches the caller.
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=8),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        return cls(client, prefix=prefix, job_ttl_s=job_ttl_s)

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout_s: float = 5.0) -> JobStore:
        return cls.from_url(
            settings.redis.url, prefix=settings.redis.key_prefix, job_ttl_s=settings.job_ttl_s, timeout_s=timeout_s
        )

    def close(self) -> None:
        self.redis.close()

    # keys
    def job_key(self, job_id: str) -> str:
        return self.keys.job(job_id)

    def events_key(self, job_id: str) -> str:
        return self.keys.events(job_id)

    def index_key(self, tenant: str) -> str:
        return self.keys.index(tenant)

    def active_key(self, tenant: str) -> str:
        return self.keys.active(tenant)

    def idem_key(self, tenant: str, key: str) -> str:
        return self.keys.idem(tenant, key)

    # reads
    def ping(self, timeout_s: float = 2.0) -> bool:
        """One quick PING on a fresh connection, without the reconnect retries (readiness must answer fast)."""
        pool = self.redis.connection_pool
        kwargs = {
            **pool.connection_kwargs,
            "retry": Retry(NoBackoff(), 0),
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
        }
        connection = pool.connection_class(**kwargs)
        try:
            connection.send_command("PING")
            return connection.read_response() in (b"PONG", "PONG", True)
        finally:
            connection.disconnect()

    def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job; JobNotFound when missing or (with ``tenant``) owned by someone else."""
        raw = self.redis.hgetall(self.job_key(job_id))
        if not raw or "status" not in raw or (tenant is not None and raw.get("tenant") != tenant):
            raise JobNotFound(job_id)
        return decode_job(raw)

    def list(
        self,
        tenant: str,
        *,
        limit: int,
        after: str | None = None,
        status: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        index = self.index_key(tenant)
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(index, after)
            if rank is None:
                raise CursorNotFound(after)
            start = rank + 1
        found: list[dict[str, Any]] = []
        batch = max(limit + 1, 50)
        while len(found) <= limit:
            ids = self.redis.zrevrange(index, start, start + batch - 1)
            if not ids:
                break
            start += len(ids)
            pipe = self.redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            expired = []
            for job_id, raw in zip(ids, pipe.execute()):
                if not raw or "status" not in raw:
                    expired.append(job_id)
                    continue
                job = decode_job(raw)
                if status is not None and job["status"] != status:
                    continue
                if labels and any(job["labels"].get(k) != v for k, v in labels.items()):
                    continue
                found.append(job)
            if expired:  # finished jobs expire; drop their index entries lazily
                self.redis.zrem(index, *expired)
                start -= len(expired)
        return found[:limit], len(found) > limit

    def tenant_of(self, job_id: str) -> str | None:
        """The job's tenant, None when the job does not exist (or expired)."""
        tenant = self.redis.hget(self.job_key(job_id), "tenant")
        return str(tenant) if tenant is not None else None

    def idempotency_record(self, tenant: str, key: str) -> tuple[str, str] | None:
        """(job id, body hash) recorded for the tenant's ``Idempotency-Key``, None if unused or expired."""
        stored = self.redis.get(self.idem_key(tenant, key))
        if not stored:
            return None
        job_id, _, digest = str(stored).partition(" ")
        return job_id, digest

    def release_output(self, uri: str, job_id: str) -> None:
        """Free the output prefix ``job_id`` reserved (only if it is still that job's)."""
        self._release(keys=[self.keys.output(uri)], args=[job_id])

    def events(self, job_id: str, *, after: str | None = None, count: int | None = None) -> list[dict[str, Any]]:
        if after == LAST_STREAM_ID:  # nothing can follow it (and Redis refuses an exclusive start there)
            return []
        start = f"({after}" if after else "-"
        return [decode_event(i, f) for i, f in self.redis.xrange(self.events_key(job_id), start, "+", count=count)]

    # writes (API)
    def create(
        self,
        *,
        tenant: str,
        spec: dict[str, Any],
        labels: dict[str, str],
        max_active: int,
        idempotency_key: str | None = None,
        body_hash: str = "",
        job_id: str | None = None,
        output_uri: str | None = None,
        webhook: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Create a queued job. Returns (job, created); created=False for an idempotent replay.

        ``output_uri``: an explicit output prefix, reserved for the job in the same atomic step
        (``OutputTaken`` when another job holds it; an idempotent replay wins over that).
        ``webhook``: ``{"url", "events"}`` (the job's or its tenant's), delivered when the job ends.
        """
        job_id = job_id or new_job_id()
        now = utcnow()
        fields = {
            "id": job_id,
            "tenant": tenant,
            "status": "queued",
            "attempt": "0",
            "created_at": now,
            "started_at": "",
            "finished_at": "",
            "updated_at": now,
            "spec": _json(spec),
            "labels": _json(labels),
            "progress": "",
            "error": "",
            "result": "",
            "cancel": "0",
            "lease_owner": "",
            "lease_until_ms": "0",
            "webhook": _json(webhook) if webhook else "",
        }
        pairs = [item for kv in fields.items() for item in kv]
        idem_key = self.idem_key(tenant, idempotency_key) if idempotency_key else f"{self.prefix}idem:-"
        outcome, other = self._create(
            keys=[
                self.job_key(job_id),
                self.events_key(job_id),
                self.index_key(tenant),
                self.active_key(tenant),
                idem_key,
                self.keys.output(output_uri) if output_uri else f"{self.prefix}output:-",
            ],
            args=[
                job_id,
                int(time.time() * 1000),
                max_active,
                "1" if idempotency_key else "0",
                body_hash,
                self.job_ttl_s,
                event_payload("status", {"status": "queued", "attempt": 0}, now),
                f"{self.prefix}job:",
                "1" if output_uri else "0",
                *pairs,
            ],
        )
        if outcome == "output_taken":
            raise OutputTaken(other)
        if outcome == "existing":
            return self.get(other, tenant), False
        if outcome == "conflict":
            raise IdempotencyConflict(other)
        if outcome == "limit":
            raise TenantLimitReached(tenant)
        return self.get(job_id), True

    def _run_transition(
        self,
        job_id: str,
        tenant: str,
        *,
        allowed: Iterable[str],
        new_status: str = "",
        attempt: int | None = None,
        event: str = "",
        fields: dict[str, str] | None = None,
    ) -> str:
        pairs = [item for kv in (fields or {}).items() for item in kv]
        outcome, status = self._transition(
            keys=[self.job_key(job_id), self.events_key(job_id), self.active_key(tenant)],
            args=[
                ",".join(allowed),
                "" if attempt is None else str(attempt),
                new_status,
                self.job_ttl_s,
                event,
                *pairs,
            ],
        )
        _raise_for(outcome, status, job_id)
        return status

    def request_cancel(self, job_id: str, tenant: str) -> dict[str, Any]:
        """queued -> canceled at once; running -> canceling (the worker winds down); terminal -> conflict."""
        self.get(job_id, tenant)
        now = utcnow()
        try:
            self._run_transition(
                job_id,
                tenant,
                allowed=["queued"],
                new_status="canceled",
                event=event_payload("status", {"status": "canceled", "attempt": 0}, now),
                fields={"cancel": "1", "finished_at": now, "updated_at": now},
            )
            # Canceled before it ran: nothing was written, so its explicit output prefix is free again.
            output_uri = ((self.get(job_id)["spec"] or {}).get("output") or {}).get("uri")
            if output_uri:
                self.release_output(output_uri, job_id)
        except TransitionConflict as conflict:
            if conflict.status in TERMINAL:
                raise
            try:
                self._run_transition(
                    job_id,
                    tenant,
                    allowed=["running"],
                    new_status="canceling",
                    event=event_payload("status", {"status": "canceling"}, now),
                    fields={"cancel": "1", "updated_at": now},
                )
            except TransitionConflict as again:
                if again.status != "canceling":  # already canceling: idempotent
                    raise
        return self.get(job_id, tenant)

    def fail_unsent(self, job_id: str, tenant: str, message: str) -> None:
        """A job whose task could not be sent to the broker: failed at once, nothing left queued."""
        now = utcnow()
        error = {"code": "broker_unavailable", "message": message, "stage": None, "retryable": True}
        self._run_transition(
            job_id,
            tenant,
            allowed=["queued"],
            new_status="failed",
            event=event_payload("status", {"status": "failed", "attempt": 0, "error": error}, now),
            fields={"error": _json(error), "finished_at": now, "updated_at": now},
        )

    # writes (worker)
    def claim(self, job_id: str, *, owner: str, lease_ttl_s: float, max_attempts: int) -> Claim:
        job = self.tenant_of(job_id)
        if job is None:
            return Claim("missing", 0, None)
        outcome, attempt, *rest = self._claim(
            keys=[self.job_key(job_id), self.events_key(job_id), self.active_key(job)],
            args=[owner, int(lease_ttl_s * 1000), max_attempts, utcnow(), self.job_ttl_s],
        )
        remaining = int(rest[1]) / 1000 if len(rest) > 1 else 0.0
        return Claim(outcome, int(attempt), rest[0] if rest else None, remaining)

    def heartbeat(
        self,
        job_id: str,
        attempt: int,
        *,
        lease_ttl_s: float,
        progress: dict[str, Any] | None = None,
    ) -> str:
        """Renew the lease (and record progress). Returns the status: ``canceling`` means stop."""
        now = utcnow()
        outcome, status = self._heartbeat(
            keys=[self.job_key(job_id), self.events_key(job_id)],
            args=[
                str(attempt),
                int(lease_ttl_s * 1000),
                _json(progress) if progress else "",
                event_payload("progress", progress, now) if progress else "",
                now,
            ],
        )
        _raise_for(outcome, status, job_id)
        return status

    # reconciler
    def _active_jobs(self, fields: tuple[str, ...], batch: int = 500) -> Iterator[tuple[str, list[str | None]]]:
        """(job id, the requested fields) of every active job over every tenant, read in pipelined batches."""
        for active_key in self.redis.scan_iter(match=_glob_escape(self.prefix) + "tenant:*:active", count=batch):
            ids = sorted(self.redis.smembers(active_key))
            for start in range(0, len(ids), batch):
                chunk = ids[start : start + batch]
                pipe = self.redis.pipeline(transaction=False)
                for job_id in chunk:
                    pipe.hmget(self.job_key(job_id), *fields)
                yield from zip(chunk, pipe.execute())

    def _now_ms(self) -> int:
        seconds, micros = self.redis.time()
        return seconds * 1000 + micros // 1000

    def expired_leases(self) -> list[str]:
        """Ids of running/canceling jobs whose lease has expired (by the Redis clock), over every tenant."""
        now_ms = self._now_ms()
        return [
            job_id
            for job_id, (status, lease_until) in self._active_jobs(("status", "lease_until_ms"))
            if status in ("running", "canceling") and int(lease_until or 0) <= now_ms
        ]

    def stale_queued(self, older_than_s: float) -> list[str]:
        """Ids of queued jobs whose task was last sent (or that were last queued) more than ``older_than_s`` ago."""
        cutoff_ms = self._now_ms() - older_than_s * 1000
        stale = []
        for job_id, (status, updated_at, sent_ms) in self._active_jobs(("status", "updated_at", "sent_ms")):
            if status != "queued" or not updated_at:
                continue
            if max(int(sent_ms or 0), int(datetime.fromisoformat(updated_at).timestamp() * 1000)) <= cutoff_ms:
                stale.append(job_id)
        return stale

    def mark_sent(self, job_id: str) -> None:
        self.redis.hset(self.job_key(job_id), "sent_ms", self._now_ms())

    def reap(self, job_id: str, *, max_attempts: int) -> str:
        """One expired-lease job -> ``requeued`` | ``failed`` | ``canceled``; ``live``/``skip``/``missing`` otherwise."""
        tenant = self.tenant_of(job_id)
        if tenant is None:
            return "missing"
        outcome, _ = self._reap(
            keys=[self.job_key(job_id), self.events_key(job_id), self.active_key(tenant)],
            args=[max_attempts, utcnow(), self.job_ttl_s],
        )
        return str(outcome)

    def log(self, job_id: str, attempt: int, message: str, **data: Any) -> None:
        """A log event of ``attempt``, appended only while that attempt still runs the job (fenced)."""
        outcome, status = self._log(
            keys=[self.job_key(job_id), self.events_key(job_id)],
            args=[str(attempt), event_payload("log", {"message": message, "attempt": attempt, **data})],
        )
        _raise_for(outcome, status, job_id)

    def complete(
        self,
        job_id: str,
        tenant: str,
        attempt: int,
        *,
        status: str,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """running|canceling -> succeeded|failed|canceled, only for the current attempt."""
        if status not in TERMINAL:
            raise ValueError(f"{status!r} is not terminal")
        now = utcnow()
        data: dict[str, Any] = {"status": status, "attempt": attempt}
        fields = {"finished_at": now, "updated_at": now, "lease_until_ms": "0"}
        if error is not None:
            data["error"] = error
            fields["error"] = _json(error)
        if result is not None:
            fields["result"] = _json(result)
        self._run_transition(
            job_id,
            tenant,
            allowed=["running", "canceling"],
            new_status=status,
            attempt=attempt,
            event=event_payload("status", data, now),
            fields=fields,
        )


class EventTail:
    """Async reads of one job's event stream for the SSE route (a blocking XREAD must not hold a thread)."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.keys = Keys(prefix)

    async def read(
        self, job_id: str, cursor: str, *, count: int = 100, block_ms: int | None = None
    ) -> list[dict[str, Any]]:
        """Events after ``cursor`` (a stream id), waiting up to ``block_ms`` for the first when given."""
        batches = await self.client.xread({self.keys.events(job_id): cursor}, count=count, block=block_ms)
        return [decode_event(event_id, fields) for _, entries in batches or [] for event_id, fields in entries]

    async def status(self, job_id: str) -> str | None:
        status = await self.client.hget(self.keys.job(job_id), "status")
        return str(status) if status is not None else None
