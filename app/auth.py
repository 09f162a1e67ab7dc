"""API keys: bearer keys compared by SHA-256 digest, each belonging to one tenant."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from app.problems import ApiProblem
from mudsc_jobs.settings import ApiKey


@dataclass(frozen=True)
class Tenant:
    name: str
    allowed_prefixes: tuple[str, ...]
    results_prefix: str

    def may_access(self, uri: str) -> bool:
        """Within one of the allowed prefixes or the tenant's own results prefix."""
        return any(uri.startswith(prefix) for prefix in (*self.allowed_prefixes, self.results_prefix))


class KeyRing:
    def __init__(self, keys: list[ApiKey], results_bucket: str) -> None:
        self._keys = keys
        self._results_bucket = results_bucket
        # presented key -> its tenant, for keys that matched: at most one entry per configured key (a key that
        # does not match is never stored), so that a valid key costs a dict lookup instead of a digest
        self._verified: dict[str, Tenant] = {}

    def lookup(self, presented: str) -> Tenant | None:
        tenant = self._verified.get(presented)
        if tenant is None:
            tenant = self._match(presented)
            if tenant is not None:
                self._verified[presented] = tenant
        return tenant

    def _match(self, presented: str) -> Tenant | None:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        match: ApiKey | None = None
        for key in self._keys:  # compare against every key: the time taken does not depend on which matched
            if hmac.compare_digest(digest, key.key_sha256):
                match = key
        if match is None:
            return None
        return Tenant(match.tenant, tuple(match.allowed_prefixes), f"s3://{self._results_bucket}/{match.tenant}/")


def bearer_key(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value; None when absent or another scheme."""
    if not header:
        return None
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return None
    return presented


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, detail, code="unauthorized", headers={"WWW-Authenticate": 'Bearer realm="mudsc"'})


async def authenticate(request: Request) -> Tenant:
    """FastAPI dependency: the tenant of the ``Authorization: Bearer`` key, else 401.

    async although it awaits nothing: a lookup of the keys already verified (else a digest and a compare), no
    I/O; a sync dependency would cost a thread-pool hop on every request."""
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing Authorization: Bearer <api key> header")
    presented = bearer_key(header)
    if presented is None:
        raise _unauthorized("Authorization header must be 'Bearer <api key>'")
    tenant = request.app.state.keyring.lookup(presented)
    if tenant is None:
        raise _unauthorized("invalid API key")
    return tenant
