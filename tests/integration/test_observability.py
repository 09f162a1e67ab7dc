"""What an operator and a user see of a real job on the stack: the merge report among the artifacts (and
``mudsc report``), the recorded metrics on the API's /metrics with their labels, and the worker's JSON log
lines naming job and attempt.

This module starts its own merge worker with ``MUDSC_WORKER__LOG_FORMAT=json`` on a queue of its own, and an
API process that sends there, beside the stack's (same Redis, same S3): its jobs run only in that worker.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as save_safetensors

from mudsc_client.cli import main as mudsc
from mudsc_core import build_model

RUN = uuid.uuid4().hex[:8]
QUEUE = f"gpu-observe-{RUN}"
ARCH = {"name": "mlp", "config": {"input_dim": 16, "hidden": [8, 8], "num_classes": 4}}


class _Receiver(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.received.append(self.headers.get("webhook-id", ""))
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, list[str]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Receiver.received
    server.shutdown()


@pytest.fixture(scope="module")
def observed(stack: Any) -> Iterator[tuple[httpx.Client, Path]]:
    """An API that sends to QUEUE, and a JSON-logging worker on QUEUE; the worker's log file."""
    name = f"obs{RUN}"
    stack.start_worker(name, queues=QUEUE, env_overrides={"MUDSC_WORKER__LOG_FORMAT": "json"})
    url, _ = stack.start_api({"MUDSC_CELERY__QUEUE": QUEUE}, name=f"api-{name}")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30) as api:
            yield api, stack.logs / f"worker-{name}.log"
    finally:
        stack.stop_process(f"api-{name}")
        stack.stop_process(f"worker-{name}")


@pytest.fixture(scope="module")
def uris(stack: Any) -> dict[str, str]:
    s3, bucket = stack.s3_client(), stack.buckets["models"]
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v.detach().clone().contiguous() for k, v in build_model(ARCH).state_dict().items()})
    good = save_safetensors(states[0])
    header = struct.unpack("<Q", good[:8])[0]
    objects = {
        "a": save_safetensors(states[0]),
        "b": save_safetensors(states[1]),
        "nan": good[: 8 + header] + b"\xff" * (len(good) - 8 - header),  # valid header, NaN weights
    }
    torch.manual_seed(2)
    objects["calib"] = save_safetensors({"inputs": torch.randn(32, 16)})
    for name, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"obs-{RUN}/{name}.safetensors", Body=body)
    return {name: f"s3://{bucket}/obs-{RUN}/{name}.safetensors" for name in objects}


def _submit(api: httpx.Client, uris: dict[str, str], b: str = "b", **extra: Any) -> str:
    spec = {
        "method": {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5}},
        "architecture": ARCH,
        "models": [{"uri": uris["a"]}, {"uri": uris[b]}],
        "calibration": {"uri": uris["calib"], "tensor": "inputs", "max_samples": 32, "batch_size": 16},
        **extra,
    }
    response = api.post("/v1/merges", json=spec)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def _wait(api: httpx.Client, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v1/merges/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def _scrape(api: httpx.Client) -> list[tuple[str, dict[str, str], float]]:
    text = api.get("/metrics").text
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, got, v in samples if n == name and all(got.get(k) == w for k, w in labels.items()))


def test_a_real_job_leaves_its_report_metrics_and_json_logs(
    observed: tuple[httpx.Client, Path], uris: dict[str, str], receiver: tuple[str, list[str]], tmp_path: Path
) -> None:
    api, worker_log = observed
    hook_url, received = receiver
    before = _scrape(api)

    ok = _submit(api, uris, webhook={"url": hook_url})
    bad = _submit(api, uris, b="nan")
    job, failed = _wait(api, ok), _wait(api, bad)
    assert job["status"] == "succeeded", job.get("error")
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_checkpoint"

    # ---- the report to look at, among the artifacts, and through the CLI
    names = {a["name"] for a in job["result"]["artifacts"]}
    assert {"report.json", "report.html", "report.png"} <= names
    args = ["--api-url", str(api.base_url), "--api-key", api.headers["Authorization"].split()[1]]
    assert mudsc([*args, "report", ok, str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page and "Merge report: mudsc" in page
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.png"]

    # ---- the metrics, with their labels (counts relative to before: the stack's Redis is shared)
    deadline = time.monotonic() + 60
    while not received and time.monotonic() < deadline:
        time.sleep(0.2)
    assert received, "the webhook was not delivered"
    time.sleep(0.5)  # the attempt is counted just after the receiver answered
    after = _scrape(api)

    def grew(name: str, by: float = 1, **labels: str) -> bool:
        return _value(after, name, **labels) - _value(before, name, **labels) >= by

    finished = "mudsc_jobs_finished_total"
    assert grew(finished, method="mudsc", outcome="succeeded", error_code="none")
    assert grew(finished, method="mudsc", outcome="failed", error_code="invalid_checkpoint")
    assert grew("mudsc_job_queue_wait_seconds_count", 2, method="mudsc")
    for stage in ("downloading", "collecting_activations", "matching", "merging", "uploading"):
        assert grew("mudsc_job_stage_duration_seconds_count", method="mudsc", stage=stage), stage
    assert grew("mudsc_job_peak_memory_bytes_count", 2, method="mudsc", memory="rss")
    peaks = [
        v for n, labels, v in after if n == "mudsc_worker_last_job_peak_memory_bytes" and labels["memory"] == "rss"
    ]
    assert peaks and all(v > 50 * 2**20 for v in peaks)  # a pool process with torch loaded
    assert grew("mudsc_webhook_delivery_attempts_total", outcome="succeeded")
    assert grew("mudsc_jobs_submitted_total", 2, method="mudsc")  # the API's own

    # ---- JSON log lines naming job and attempt (the Celery banner is printed, not logged)
    entries = [json.loads(line) for line in worker_log.read_text().splitlines() if line.startswith("{")]
    assert entries, "no JSON log lines"
    for job_id in (ok, bad):
        own = [e for e in entries if e["job_id"] == job_id]
        assert own and all(e["attempt"] in (None, 1) for e in own)
        assert any(e["attempt"] == 1 for e in own)
        mentions = [e for e in entries if job_id in e["message"] and e["process"] != "MainProcess"]
        assert mentions and all(e["job_id"] == job_id for e in mentions)
