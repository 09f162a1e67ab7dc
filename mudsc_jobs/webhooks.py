"""Signed webhooks (Standard Webhooks): signatures, the outbound address policy, the event body, dispatch.

Shared by the API (which checks a job's webhook at submission and notifies on cancel), the reconciler (which
re-sends lost deliveries) and the webhook worker (``worker/webhooks.py``, which signs, sends and records).
The delivery records themselves live in Redis (``mudsc_jobs/webhook_store.py``).

- Signature: ``v1,`` + base64 HMAC-SHA256 over ``{webhook-id}.{webhook-timestamp}.{body}``, keyed with the
  base64-decoded part of the tenant's ``whsec_`` secret; one signature per valid secret, space-separated, so a
  secret can be rotated without a gap.
- Outbound safety: the host must be on the tenant's allow-list; every address it resolves to must be a public
  unicast address (private, loopback, link-local, shared, reserved ones are refused unless
  ``MUDSC_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES``; unspecified and multicast ones always are). The worker resolves
  once, checks, and connects to that very address (no second lookup that DNS rebinding could answer).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from celery import Celery

    from mudsc_jobs.settings import Settings, TenantWebhooks
    from mudsc_jobs.webhook_store import WebhookStore

logger = logging.getLogger(__name__)

WEBHOOK_TASK_NAME = "mudsc.webhook.deliver"
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookRefused(ValueError):
    """A webhook URL (or the address it resolves to) that this service will not call; the message says why."""


# ----------------------------------------------------------------------------------------------- signatures
def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256>`` per secret, space-separated."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(secret_key(s), signed, hashlib.sha256).digest()).decode() for s in secrets
    )


def headers(secrets: Sequence[str], webhook_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, webhook_id, timestamp, body),
    }


# ----------------------------------------------------------------------------------------------- the event
def public_job(job: dict[str, Any]) -> dict[str, Any]:
    """The job as the API returns it (``app.schemas.Job``): the store's record without its tenant."""
    return {key: value for key, value in job.items() if key != "tenant"}


def event_body(job: dict[str, Any], event_type: str) -> bytes:
    """``{"type": "merge.<status>", "timestamp", "data": <job>}``: built once, then sent as-is on every retry."""
    body = {"type": event_type, "timestamp": job.get("finished_at") or job["created_at"], "data": public_job(job)}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay after failed attempt ``attempt`` (1-based): ``base * 2^(attempt-1)`` capped at ``max``, with
    "equal jitter" (between half of it and all of it), so that receivers coming back are not hit in lockstep."""
    full = min(max_s, base_s * 2.0 ** min(attempt - 1, 60))
    return full / 2 + (rng or random).uniform(0, full / 2)


# ----------------------------------------------------------------------------------------------- address policy
def address_refusal(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why the service will not connect to ``address`` (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded, allow_private=allow_private)
    if address.is_unspecified:
        return f"{address} is the unspecified address"
    if address.is_multicast:
        return f"{address} is a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address("255.255.255.255"):
        return f"{address} is the broadcast address"
    if allow_private or address.is_global:
        return None
    kind = (
        "loopback"
        if address.is_loopback
        else "link-local"
        if address.is_link_local
        else "private"
        if address.is_private
        else "non-public"
    )
    return f"{address} is a {kind} address"


def host_allowed(host: str, allowed_hosts: Iterable[str]) -> bool:
    """Exact (case-insensitive) names or IP literals, or ``*.example.com`` for its subdomains."""
    host = host.lower().rstrip(".")
    for allowed in allowed_hosts:
        if allowed.startswith("*."):
            if host.endswith(allowed[1:]) and len(host) > len(allowed) - 1:
                return True
        elif host == allowed:
            return True
    return False


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in the resolver's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def url_parts(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a webhook URL (the job spec validated its syntax)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, host, port


def check_url(url: str, tenant: TenantWebhooks | None, settings: Settings, tenant_name: str) -> None:
    """What may be checked without sending: scheme, allow-list, secrets; a literal address. WebhookRefused if not."""
    if tenant is None or not tenant.secrets:
        raise WebhookRefused(f"no webhook signing secret is configured for tenant {tenant_name!r}")
    scheme, host, _ = url_parts(url)
    if scheme != "https" and not (scheme == "http" and settings.webhooks.allow_http):
        raise WebhookRefused("must be an https:// URL")
    if not host_allowed(host, tenant.allowed_hosts):
        raise WebhookRefused(f"host {host!r} is not on the tenant's list of allowed webhook hosts")
    literal = _literal(host)
    if literal is not None:
        reason = address_refusal(literal, allow_private=settings.webhooks.allow_private_addresses)
        if reason:
            raise WebhookRefused(f"refused address: {reason}")


def pinned_address(host: str, port: int, *, allow_private: bool, resolver: Resolver = resolve) -> str:
    """Resolve ``host`` once and return the address to connect to; WebhookRefused when any address is refused
    (a name that also points somewhere private is not called at all), OSError when it does not resolve."""
    literal = _literal(host)
    addresses = [str(literal)] if literal is not None else resolver(host, port)
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    for address in addresses:
        reason = address_refusal(ipaddress.ip_address(address.split("%")[0]), allow_private=allow_private)
        if reason:
            raise WebhookRefused(f"refused address: {reason}")
    return addresses[0]


def check_resolved(url: str, settings: Settings, resolver: Resolver = resolve) -> None:
    """At submission: a name that resolves now to a refused address is refused (a name that does not resolve
    yet is not: the delivery checks again, and records why it could not connect)."""
    _, host, port = url_parts(url)
    try:
        pinned_address(host, port, allow_private=settings.webhooks.allow_private_addresses, resolver=resolver)
    except OSError:
        return


# ----------------------------------------------------------------------------------------------- dispatch
def send_delivery(sender: Celery, settings: Settings, job_id: str, countdown: float | None = None) -> None:
    sender.send_task(
        WEBHOOK_TASK_NAME,
        args=[job_id],
        queue=settings.webhooks.queue,
        countdown=countdown,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    )


def notify(sender: Celery, settings: Settings, deliveries: WebhookStore, job_id: str) -> bool:
    """After a terminal status write: send the job's pending delivery to the webhooks queue, if it has one.

    Never raises: the delivery is already recorded as pending (atomically with the status), so a send that
    fails here (or a process that dies before it) is made good by the reconciler's sweep.
    """
    try:
        if not deliveries.is_pending(job_id):
            return False
        send_delivery(sender, settings, job_id)
        return True
    except Exception as exc:  # noqa: BLE001 - kombu and redis raise several types; the reconciler re-sends
        logger.warning("job %s: webhook delivery not sent now (%s); the reconciler will send it", job_id, exc)
        return False
