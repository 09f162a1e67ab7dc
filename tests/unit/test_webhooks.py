"""Webhook signatures against an independent implementation (the ``standardwebhooks`` package), the outbound
address policy over address classes (Hypothesis), host allow-lists, backoff, and the job spec's webhook field."""

from __future__ import annotations

import base64
import ipaddress
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from mudsc_core.schema import JobSpec, WebhookSpec
from mudsc_jobs.settings import Settings, TenantWebhooks
from mudsc_jobs.webhooks import (
    WebhookRefused,
    address_refusal,
    backoff_s,
    check_url,
    event_body,
    headers,
    host_allowed,
    pinned_address,
    public_job,
    sign,
)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
NEW_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()


# ----------------------------------------------------------------------------------------------- signatures
@given(
    webhook_id=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    body=st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(max_size=20)), max_size=5),
)
def test_signature_verifies_with_standardwebhooks(webhook_id: str, body: dict[str, object]) -> None:
    payload = json.dumps(body).encode()
    now = int(time.time())
    signed = headers([SECRET], webhook_id, now, payload)
    assert Webhook(SECRET).verify(payload, signed) == body
    # and it is the reference's own signature
    assert signed["webhook-signature"] == Webhook(SECRET).sign(webhook_id, _utc(now), payload.decode())


def _utc(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_rotation_signs_with_every_secret_and_either_verifies() -> None:
    payload = b'{"type":"merge.succeeded"}'
    signed = headers([SECRET, NEW_SECRET], "msg_1", int(time.time()), payload)
    assert len(signed["webhook-signature"].split(" ")) == 2
    assert all(part.startswith("v1,") for part in signed["webhook-signature"].split(" "))
    Webhook(SECRET).verify(payload, signed)
    Webhook(NEW_SECRET).verify(payload, signed)


def test_a_changed_body_id_or_timestamp_does_not_verify() -> None:
    payload, now = b'{"a":1}', int(time.time())
    signed = headers([SECRET], "msg_1", now, payload)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"a":2}', signed)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(payload, {**signed, "webhook-id": "msg_2"})
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(payload, {**signed, "webhook-timestamp": str(now + 1)})
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW_SECRET).verify(payload, signed)
    assert sign([SECRET], "msg_1", now, payload) == signed["webhook-signature"]


def test_event_body_is_the_public_job() -> None:
    job = {"id": "mrg_X", "status": "failed", "created_at": "t0", "finished_at": "t1", "tenant": "acme"}
    body = json.loads(event_body(job, "merge.failed"))
    assert body == {"type": "merge.failed", "timestamp": "t1", "data": public_job(job)}
    assert "tenant" not in body["data"]


# ----------------------------------------------------------------------------------------------- addresses
def _addresses(network: str) -> st.SearchStrategy[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return st.ip_addresses(network=network)


NON_PUBLIC = st.one_of(
    _addresses("127.0.0.0/8"),  # loopback
    _addresses("::1/128"),
    _addresses("10.0.0.0/8"),  # private
    _addresses("172.16.0.0/12"),
    _addresses("192.168.0.0/16"),
    _addresses("fc00::/7"),
    _addresses("169.254.0.0/16"),  # link-local (cloud metadata lives here)
    _addresses("fe80::/10"),
    _addresses("100.64.0.0/10"),  # shared (carrier-grade NAT)
    _addresses("192.0.2.0/24"),  # documentation
    _addresses("240.0.0.0/5"),  # reserved
)
ALWAYS_REFUSED = st.one_of(
    st.just(ipaddress.ip_address("0.0.0.0")),
    st.just(ipaddress.ip_address("::")),
    _addresses("224.0.0.0/4"),  # multicast
    _addresses("ff00::/8"),
)
PUBLIC = st.one_of(_addresses("8.8.0.0/16"), _addresses("1.1.1.0/24"), _addresses("2001:4860::/32"))


@given(NON_PUBLIC)
def test_non_public_addresses_are_refused_unless_allowed(address: ipaddress.IPv4Address) -> None:
    assert address_refusal(address, allow_private=False) is not None
    assert address_refusal(address, allow_private=True) is None


@given(NON_PUBLIC.filter(lambda a: a.version == 4))
def test_ipv4_mapped_and_nat64_forms_are_judged_as_the_ipv4_address(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    nat64 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(address))
    assert address_refusal(mapped, allow_private=False) is not None
    assert address_refusal(nat64, allow_private=False) is not None


@given(ALWAYS_REFUSED)
def test_unspecified_and_multicast_are_always_refused(address: ipaddress.IPv4Address) -> None:
    assert address_refusal(address, allow_private=True) is not None


@given(PUBLIC)
def test_public_addresses_are_allowed(address: ipaddress.IPv4Address) -> None:
    assert address_refusal(address, allow_private=False) is None


def test_a_name_with_any_refused_address_is_refused_and_the_checked_address_is_pinned() -> None:
    def resolver(answers: list[str]) -> Callable[[str, int], list[str]]:
        return lambda host, port: answers

    assert pinned_address("hooks.example.com", 443, allow_private=False, resolver=resolver(["8.8.8.8"])) == "8.8.8.8"
    with pytest.raises(WebhookRefused, match="loopback"):
        pinned_address("rebind.example", 443, allow_private=False, resolver=resolver(["8.8.8.8", "127.0.0.1"]))
    with pytest.raises(WebhookRefused, match="link-local"):
        pinned_address("169.254.169.254", 80, allow_private=False, resolver=resolver([]))
    with pytest.raises(OSError):
        pinned_address("nothing.example", 443, allow_private=False, resolver=resolver([]))


# ----------------------------------------------------------------------------------------------- URLs and hosts
def test_host_allow_list() -> None:
    allowed = ["hooks.example.com", "*.acme.io", "127.0.0.1"]
    assert host_allowed("hooks.example.com", allowed) and host_allowed("HOOKS.example.com.", allowed)
    assert host_allowed("a.acme.io", allowed) and host_allowed("a.b.acme.io", allowed)
    assert not host_allowed("acme.io", allowed) and not host_allowed("evilacme.io", allowed)
    assert not host_allowed("hooks.example.com.evil.net", allowed) and host_allowed("127.0.0.1", allowed)


def _settings(**webhooks: object) -> Settings:
    return Settings.model_validate({"webhooks": webhooks})


def test_check_url_reasons() -> None:
    tenant = TenantWebhooks(secrets=[SECRET], allowed_hosts=["hooks.example.com", "127.0.0.1"])
    strict = _settings()
    check_url("https://hooks.example.com/x", tenant, strict, "acme")
    for url, reason in [
        ("http://hooks.example.com/x", "https"),
        ("https://other.example.com/x", "allowed webhook hosts"),
        ("https://127.0.0.1/x", "loopback"),
    ]:
        with pytest.raises(WebhookRefused, match=reason):
            check_url(url, tenant, strict, "acme")
    with pytest.raises(WebhookRefused, match="secret"):
        check_url("https://hooks.example.com/x", TenantWebhooks(allowed_hosts=["hooks.example.com"]), strict, "acme")
    with pytest.raises(WebhookRefused, match="secret"):
        check_url("https://hooks.example.com/x", None, strict, "acme")
    check_url("http://127.0.0.1:8080/x", tenant, _settings(allow_http=True, allow_private_addresses=True), "acme")


@pytest.mark.parametrize(
    "secret", ["nope", "whsec_", "whsec_!!!!", "whsec_" + base64.b64encode(b"short").decode()], ids=repr
)
def test_malformed_secrets_are_refused_by_settings(secret: str) -> None:
    with pytest.raises(ValidationError):
        TenantWebhooks(secrets=[secret])


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/",
        "https://",
        "https://user:pw@hooks.example.com/",
        "https://hooks.example.com/#frag",
        "https://hooks.example.com/ x",
        "https://hooks.example.com:99999/",
        "https://hooks.example.com/" + "x" * 2048,
    ],
)
def test_bad_webhook_urls_fail_the_spec(url: str) -> None:
    with pytest.raises(ValidationError):
        WebhookSpec(url=url)


def test_webhook_events_default_and_validation() -> None:
    assert WebhookSpec(url="https://h.example/").events == ["succeeded", "failed", "canceled"]
    with pytest.raises(ValidationError):
        WebhookSpec(url="https://h.example/", events=[])
    with pytest.raises(ValidationError):
        WebhookSpec(url="https://h.example/", events=["succeeded", "succeeded"])
    with pytest.raises(ValidationError):
        WebhookSpec(url="https://h.example/", events=["queued"])
    spec = JobSpec.model_validate(
        {
            "method": {"name": "linear"},
            "models": [{"uri": "s3://models/a.safetensors"}, {"uri": "s3://models/b.safetensors"}],
            "webhook": {"url": "https://h.example/", "events": ["failed"]},
        }
    )
    assert spec.webhook is not None and spec.webhook.events == ["failed"]


# ----------------------------------------------------------------------------------------------- backoff
@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_backoff_grows_within_jittered_bounds(attempt: int, seed: int) -> None:
    delay = backoff_s(attempt, 2.0, 300.0, random.Random(seed))
    full = min(300.0, 2.0 * 2 ** (attempt - 1))
    assert full / 2 <= delay <= full


# ----------------------------------------------------------------------------------------------- the sender
class _Handler(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("location", "http://127.0.0.1:1/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()
        elif self.path == "/huge":  # a body that would take long to read: it is not read
            self.send_response(200)
            self.send_header("content-length", str(10**9))
            self.end_headers()
            self.wfile.write(b"x" * 65536)
            time.sleep(5)
        else:
            self.send_response(204)
            self.end_headers()


@pytest.fixture(scope="module")
def local_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()


def _loopback_settings() -> Settings:
    return _settings(allow_http=True, allow_private_addresses=True, timeout_s=3, connect_timeout_s=1)


def test_sender_follows_no_redirect_and_reads_no_body(local_server: int) -> None:
    from worker.webhooks import post

    redirect = post(f"http://127.0.0.1:{local_server}/redirect", b"{}", {}, _loopback_settings())
    assert redirect.response_code == 302 and len(_Handler.seen) >= 1
    started = time.monotonic()
    huge = post(f"http://127.0.0.1:{local_server}/huge", b"{}", {}, _loopback_settings())
    assert huge.response_code == 200 and time.monotonic() - started < 2.5


def test_sender_resolves_once_and_connects_to_the_checked_address(
    local_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.webhooks import post

    real = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        try:
            ipaddress.ip_address(host)
            return real(host, *args, **kwargs)
        except ValueError:
            lookups.append(host)  # first answer loopback (checked), any later one a refused address
            answer = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, args[0] if args else 0))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    outcome = post(f"http://rebind.test:{local_server}/ok", b"{}", {"webhook-id": "msg_x"}, _loopback_settings())
    assert outcome.response_code == 204 and lookups == ["rebind.test"]
    assert _Handler.seen[-1]["host"] == f"rebind.test:{local_server}" and _Handler.seen[-1]["webhook-id"] == "msg_x"
    strict = _settings(allow_http=True)
    refused = post(f"http://rebind.test:{local_server}/ok", b"{}", {}, strict)
    assert refused.final and refused.response_code is None and "link-local" in (refused.error or "")
