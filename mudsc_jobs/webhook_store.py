"""Webhook delivery records in Redis (the job store's ``webhooks`` attribute).

Layout (``mudsc_jobs.store.Keys``; every key starts with the store's prefix):

- ``job:{id}:webhook``           hash: the delivery of the job's terminal event: ``webhook_id``, ``type``, ``url``,
                                 ``status`` (pending | delivering | retrying | delivered | failed | disabled),
                                 ``attempts``, ``next_attempt_ms``, the in-flight attempt and its lease, ``body``
- ``job:{id}:webhook:attempts``  list: every finished attempt, oldest first (JSON)
- ``webhooks:pending``           sorted set: job ids of unfinished deliveries, scored by when something must
                                 happen next (due, retry time, end of the in-flight lease); the reconciler sends
                                 again those overdue by ``MUDSC_WEBHOOKS__RESEND_AFTER_S``

The record is created by the job store's terminal-status scripts (``queue_webhook``), atomically with the
status. An attempt holds a lease (so two deliveries of one event are not in flight at once); an attempt whose
worker died is listed as ``interrupted`` when the next one begins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from mudsc_jobs.store import Keys

FINAL = ("delivered", "failed", "disabled")
_MAX_ATTEMPTS_LISTED = 1000

_LUA_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function is_final(s) return s == 'delivered' or s == 'failed' or s == 'disabled' end
"""

# KEYS: delivery, attempts, pending; ARGV: job id, owner, lease_ms, body, deadline_ms, ttl, slack_ms
_LUA_BEGIN = (
    _LUA_NOW
    + """
local d = redis.call('HMGET', KEYS[1], 'status', 'lease_until_ms', 'next_attempt_ms', 'attempts', 'inflight')
if not d[1] then redis.call('ZREM', KEYS[3], ARGV[1]); return {'missing', '0'} end
if is_final(d[1]) then redis.call('ZREM', KEYS[3], ARGV[1]); return {'final', '0', d[1]} end
local now = now_ms()
if tonumber(d[2] or '0') > now then return {'busy', '0', d[1]} end
if tonumber(d[3] or '0') > now + tonumber(ARGV[7]) then return {'early', '0', d[1]} end
if d[5] and d[5] ~= '' then
  local lost = cjson.decode(d[5])
  lost['status'] = 'interrupted'
  lost['error'] = 'the worker delivering it was lost before the attempt ended'
  redis.call('RPUSH', KEYS[2], cjson.encode(lost))
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
local attempt = tonumber(d[4] or '0') + 1
local lease_end = now + tonumber(ARGV[3])
redis.call('HSETNX', KEYS[1], 'body', ARGV[4])
redis.call('HSETNX', KEYS[1], 'deadline_ms', ARGV[5])
redis.call('HSET', KEYS[1], 'status', 'delivering', 'attempts', attempt, 'lease_owner', ARGV[2],
  'lease_until_ms', lease_end, 'inflight', cjson.encode({attempt=attempt, started_ms=now}))
redis.call('ZADD', KEYS[3], lease_end, ARGV[1])
return {'begun', tostring(attempt), 'delivering', redis.call('HGET', KEYS[1], 'body'),
  redis.call('HGET', KEYS[1], 'deadline_ms'), tostring(now)}
"""
)

# KEYS: delivery, attempts, pending; ARGV: job id, owner, attempt JSON, new status, next_attempt_ms, ttl
_LUA_FINISH = (
    _LUA_NOW
    + """
local d = redis.call('HMGET', KEYS[1], 'status', 'lease_owner')
if not d[1] then return {'missing', ''} end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if is_final(d[1]) then return {'final', d[1]} end
if d[2] ~= ARGV[2] then return {'stale', d[1]} end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'lease_owner', '', 'lease_until_ms', '0', 'inflight', '',
  'next_attempt_ms', ARGV[5])
if is_final(ARGV[4]) then
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
end
return {'ok', ARGV[4]}
"""
)


def _iso(ms: int | str | None) -> str | None:
    if ms in (None, "", "0", 0):
        return None
    when = datetime.fromtimestamp(int(ms) / 1000, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Delivery:
    job_id: str
    webhook_id: str
    type: str
    url: str
    status: str
    attempts: int
    created_ms: int
    next_attempt_ms: int

    def public(self) -> dict[str, Any]:
        return {
            "webhook_id": self.webhook_id,
            "type": self.type,
            "url": self.url,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": _iso(self.created_ms),
            "next_attempt_at": None if self.status in FINAL else _iso(self.next_attempt_ms),
        }


@dataclass(frozen=True)
class Begun:
    outcome: str  # begun | busy | early | final | missing
    attempt: int = 0
    body: bytes = b""
    deadline_ms: int = 0
    now_ms: int = 0


class WebhookStore:
    def __init__(self, client: redis.Redis, keys: Keys, job_ttl_s: int) -> None:
        self.redis = client
        self.keys = keys
        self.job_ttl_s = job_ttl_s
        self._begin = client.register_script(_LUA_BEGIN)
        self._finish = client.register_script(_LUA_FINISH)

    def _keys(self, job_id: str) -> list[str]:
        return [self.keys.webhook(job_id), self.keys.webhook_attempts(job_id), self.keys.webhooks_pending()]

    def get(self, job_id: str) -> Delivery | None:
        raw = self.redis.hgetall(self.keys.webhook(job_id))
        if not raw or "status" not in raw:
            return None
        return Delivery(
            job_id=job_id,
            webhook_id=raw["webhook_id"],
            type=raw["type"],
            url=raw["url"],
            status=raw["status"],
            attempts=int(raw.get("attempts") or 0),
            created_ms=int(raw.get("created_ms") or 0),
            next_attempt_ms=int(raw.get("next_attempt_ms") or 0),
        )

    def is_pending(self, job_id: str) -> bool:
        """A delivery that no attempt has started yet (the one to send right after the status write)."""
        return self.redis.hget(self.keys.webhook(job_id), "status") == "pending"

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Every finished attempt, oldest first, as the API lists them."""
        out = []
        for raw in self.redis.lrange(self.keys.webhook_attempts(job_id), 0, _MAX_ATTEMPTS_LISTED - 1):
            entry = json.loads(raw)
            out.append(
                {
                    "attempt": int(entry["attempt"]),
                    "status": entry["status"],
                    "started_at": _iso(entry.get("started_ms")),
                    "response_code": entry.get("response_code"),
                    "duration_ms": entry.get("duration_ms"),
                    "error": entry.get("error"),
                    "next_attempt_at": _iso(entry.get("next_attempt_ms")),
                }
            )
        return out

    def begin(self, job_id: str, *, owner: str, lease_s: float, body: bytes, deadline_ms: int) -> Begun:
        """Start an attempt: take the lease, fix the body (and the retry deadline) on the first attempt."""
        outcome, attempt, *rest = self._begin(
            keys=self._keys(job_id),
            args=[job_id, owner, int(lease_s * 1000), body, deadline_ms, self.job_ttl_s, 1000],
        )
        if outcome != "begun":
            return Begun(str(outcome))
        stored_body, deadline, now = rest[1], rest[2], rest[3]
        return Begun("begun", int(attempt), str(stored_body).encode(), int(deadline), int(now))

    def finish(
        self,
        job_id: str,
        *,
        owner: str,
        attempt: dict[str, Any],
        status: str,
        next_attempt_ms: int = 0,
    ) -> str:
        """Record a finished attempt and the delivery's new status (``stale`` if another attempt took over)."""
        outcome, _ = self._finish(
            keys=self._keys(job_id),
            args=[job_id, owner, json.dumps(attempt, separators=(",", ":")), status, next_attempt_ms, self.job_ttl_s],
        )
        return str(outcome)

    def overdue(self, older_than_s: float, limit: int = 500) -> list[str]:
        """Job ids of unfinished deliveries whose next step is more than ``older_than_s`` overdue."""
        seconds, micros = self.redis.time()
        cutoff = seconds * 1000 + micros // 1000 - int(older_than_s * 1000)
        return [str(i) for i in self.redis.zrangebyscore(self.keys.webhooks_pending(), "-inf", cutoff, 0, limit)]

    def resent(self, job_id: str) -> None:
        """The reconciler sent the delivery again: due now (so it is not re-sent before another grace period)."""
        seconds, micros = self.redis.time()
        if self.redis.exists(self.keys.webhook(job_id)):
            self.redis.zadd(self.keys.webhooks_pending(), {job_id: seconds * 1000 + micros // 1000}, xx=True)
        else:  # the job (and its delivery) expired
            self.redis.zrem(self.keys.webhooks_pending(), job_id)
