"""A small synchronous client of the merge service's REST API (httpx; torch-free).

client = MudscClient.from_env()            # MUDSC_API_URL / MUDSC_API_KEY (or an env file you name)
job = client.submit(spec)                  # spec: dict (or a JobSpec)
for event in client.stream(job["id"]):     # Server-Sent Events until the terminal event
    ...
paths = client.download(job["id"], "out/") # presigned URLs, sha256-checked
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

# The job statuses that never change again (the REST contract; the server's copy is ``mudsc_jobs.store.TERMINAL``,
# and a test keeps the two equal: this package installs without the server).
TERMINAL = frozenset({"succeeded", "failed", "canceled"})
REPORT_FILES = ("report.html", "report.png")  # the merge report to look at (beside report.json)


class ApiError(Exception):
    """A non-2xx answer; ``problem`` is the RFC 9457 body when the server sent one."""

    def __init__(self, status: int, problem: Mapping[str, Any] | None, text: str = "") -> None:
        self.status = status
        self.problem = dict(problem or {})
        detail = self.problem.get("detail") or self.problem.get("title") or text[:500]
        errors = self.problem.get("errors") or []
        if errors:
            detail = f"{detail}: " + "; ".join(
                f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in errors[:10]
            )
        super().__init__(f"HTTP {status}: {detail}")


class DownloadError(Exception):
    """An artifact whose bytes do not match the size or sha256 the service recorded."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (values may be shell-quoted, ``export`` allowed), e.g. the local stack's ``.stack/env``."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :]
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        parts = shlex.split(raw)
        values[key.strip()] = parts[0] if parts else ""
    return values


class MudscClient:
    def __init__(
        self, base_url: str, api_key: str, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
        )
        self._downloads = httpx.Client(timeout=httpx.Timeout(timeout, read=300.0), follow_redirects=True)

    @classmethod
    def from_env(
        cls,
        env_file: Path | str | None = None,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        **kwargs: Any,
    ) -> MudscClient:
        """Explicit arguments, else ``MUDSC_API_URL``/``MUDSC_API_KEY``, else ``env_file`` when one is named.

        ``env_file`` (or ``MUDSC_ENV_FILE``) is a ``KEY=value`` file such as the local stack's ``.stack/env``.
        """
        url = api_url or os.environ.get("MUDSC_API_URL")
        key = api_key or os.environ.get("MUDSC_API_KEY")
        named = env_file or os.environ.get("MUDSC_ENV_FILE")
        if (not url or not key) and named:
            path = Path(named)
            if not path.is_file():
                raise ValueError(f"env file {path} does not exist")
            values = read_env_file(path)
            url, key = url or values.get("MUDSC_API_URL"), key or values.get("MUDSC_API_KEY")
        if not url or not key:
            raise ValueError("set MUDSC_API_URL and MUDSC_API_KEY, or name an env file (--env-file / MUDSC_ENV_FILE)")
        return cls(url, key, **kwargs)

    def close(self) -> None:
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> MudscClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = None
            raise ApiError(response.status_code, problem if isinstance(problem, dict) else None, response.text)
        return response

    # ------------------------------------------------------------------ routes
    def submit(self, spec: Mapping[str, Any] | Any, idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /v1/merges``; returns the job (202 new, 200 when the idempotency key matched)."""
        body = spec.model_dump(mode="json", exclude_none=True) if hasattr(spec, "model_dump") else dict(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/merges", json=body, headers=headers).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/merges/{job_id}").json()

    def list(
        self, *, status: str | None = None, label: str | None = None, limit: int = 20, after: str | None = None
    ) -> dict[str, Any]:
        """One page: ``{"data": [...], "has_more": bool}``, newest first."""
        params: dict[str, Any] = {"limit": limit}
        for name, value in (("status", status), ("label", label), ("after", after)):
            if value is not None:
                params[name] = value
        return self._request("GET", "/v1/merges", params=params).json()

    def iter_jobs(self, **filters: Any) -> Iterator[dict[str, Any]]:
        after = None
        while True:
            page = self.list(after=after, **filters)
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/merges/{job_id}/cancel").json()

    def events(self, job_id: str, after: str | None = None) -> list[dict[str, Any]]:
        params = {"after": after} if after else {}
        body = self._request("GET", f"/v1/merges/{job_id}/events", params=params).json()
        return body["data"] if isinstance(body, dict) else body

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/merges/{job_id}/artifacts").json()["data"]

    def webhook_deliveries(self, job_id: str) -> dict[str, Any]:
        """The job's webhook delivery and its attempts: ``{"delivery": {...} | None, "data": [attempts]}``."""
        return self._request("GET", f"/v1/merges/{job_id}/webhook-deliveries").json()

    def methods(self) -> list[dict[str, Any]]:
        body = self._request("GET", "/v1/methods").json()
        return body["data"] if isinstance(body, dict) else body

    # ------------------------------------------------------------------ streaming and waiting
    def stream(
        self, job_id: str, *, last_event_id: str | None = None, reconnect: bool = True, read_timeout: float = 60.0
    ) -> Iterator[dict[str, Any]]:
        """Events of ``GET /v1/merges/{id}/events/stream`` until the job is terminal.

        Each item is an event ``{"id", "time", "type", "data"}``. A dropped connection is resumed
        with ``Last-Event-ID`` (so no event is lost or repeated) while ``reconnect`` is true.
        """
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            terminal = False
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/merges/{job_id}/events/stream",
                    headers=headers,
                    timeout=httpx.Timeout(10.0, read=read_timeout),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        try:
                            problem = response.json()
                        except ValueError:
                            problem = None
                        raise ApiError(
                            response.status_code, problem if isinstance(problem, dict) else None, response.text
                        )
                    for event in _parse_sse(response.iter_lines()):
                        if event.get("id"):
                            last_event_id = str(event["id"])
                        yield event
                        if _is_terminal_event(event):
                            terminal = True
            except (httpx.TransportError, httpx.StreamError):
                if not reconnect:
                    raise
                time.sleep(0.5)
            if terminal or not reconnect:
                return
            if self.get(job_id)["status"] in TERMINAL:
                # The stream ended early but the job is over: hand out what the stream did not.
                yield from self.events(job_id, after=last_event_id)
                return

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 0.5) -> dict[str, Any]:
        """Poll until the job is terminal; returns the job. TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f}s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ download
    def download(self, job_id: str, dest_dir: Path | str, names: Collection[str] | None = None) -> list[Path]:
        """Fetch every artifact (or those ``names``) through its presigned URL into ``dest_dir``; checks size and
        sha256."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in self.artifacts(job_id):
            if names is not None and artifact["name"] not in names:
                continue
            name = PurePosixPath(artifact["name"])
            if name.is_absolute() or ".." in name.parts or not name.parts:
                raise DownloadError(f"refusing artifact name {artifact['name']!r}")
            target = dest.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".part")
            digest, size = hashlib.sha256(), 0
            with self._downloads.stream("GET", artifact["url"]) as response:
                response.raise_for_status()
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            expected_sha, expected_size = artifact.get("sha256"), artifact.get("size")
            if (expected_sha and digest.hexdigest() != expected_sha) or (
                expected_size is not None and size != expected_size
            ):
                partial.unlink(missing_ok=True)
                raise DownloadError(
                    f"{artifact['name']}: got {size} bytes sha256 {digest.hexdigest()}, "
                    f"expected {expected_size} bytes sha256 {expected_sha}"
                )
            partial.replace(target)
            paths.append(target)
        return paths

    def download_report(self, job_id: str, dest_dir: Path | str) -> list[Path]:
        """Fetch the job's merge report to look at: ``report.html`` (self-contained) and ``report.png``."""
        paths = self.download(job_id, dest_dir, names=REPORT_FILES)
        if not any(p.name == REPORT_FILES[0] for p in paths):
            raise DownloadError(f"job {job_id} has no {REPORT_FILES[0]} among its artifacts")
        return paths


def _parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-Sent Events -> job events. ``data`` is the event JSON (or the payload of ``event:``)."""
    event_id: str | None = None
    event_type: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield _to_event(event_id, event_type, "\n".join(data))
            event_id, event_type, data = None, None, []
            continue
        if line.startswith(":"):
            continue  # comment / keep-alive ping
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            event_type = value
        elif field == "data":
            data.append(value)
    if data:
        yield _to_event(event_id, event_type, "\n".join(data))


def _to_event(event_id: str | None, event_type: str | None, raw: str) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw
    if isinstance(payload, dict) and "type" in payload and "data" in payload:
        event = dict(payload)
        event.setdefault("id", event_id)
        return event
    return {"id": event_id, "type": event_type or "message", "data": payload}


def _is_terminal_event(event: Mapping[str, Any]) -> bool:
    data = event.get("data")
    return event.get("type") == "status" and isinstance(data, Mapping) and data.get("status") in TERMINAL
