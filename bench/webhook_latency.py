"""Webhook delivery latency against the local stack: event (the job's terminal status) to the first attempt.

    PYTHONPATH=. .venv/bin/python -m bench.webhook_latency [--jobs 100] [--env-file .stack/env]
        [--interval 0] [--out docs/bench_webhook_latency.txt]

Starts the local stack (``make up``) when ``.stack/env`` is missing or its API does not answer; otherwise uses
the running one. Then:

1. starts an HTTP receiver on 127.0.0.1 (a free port, in this process) that records the arrival time of each
   POST, verifies its Standard Webhooks signature with the ``standardwebhooks`` package and
   ``MUDSC_WEBHOOK_SECRET``, and answers 204;
2. uploads two tiny 2-layer MLP checkpoints (safetensors) to S3;
3. submits ``--jobs`` ``weight_average`` jobs (no calibration) through ``MudscClient``, each with
   ``"webhook": {"url": "http://127.0.0.1:<port>/hook"}`` (a 429 from the tenant's cap on active jobs is
   retried 0.2 s later with the same idempotency key, so only a few jobs run at once), and waits for all;
4. per job: event = ``finished_at``; first attempt = ``started_at`` of the first attempt listed by
   ``GET /v1/merges/{id}/webhook-deliveries`` (``client.webhook_deliveries``); arrival = the receiver's clock
   at the first POST carrying that job's webhook-id. The API, the workers and this process share one host
   clock, so the differences need no clock sync; ``finished_at`` and ``started_at`` have millisecond resolution.

Prints p50/p95/max of (first attempt - finished_at) and (arrival - finished_at) in ms, how many jobs were
delivered exactly once (by webhook-id) with a valid signature, and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save  # noqa: E402
from standardwebhooks import Webhook, WebhookVerificationError  # noqa: E402

from mudsc_client.client import ApiError, MudscClient, read_env_file  # noqa: E402
from scripts.demo import s3_client  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}
ARCHITECTURE = {"name": "mlp", "config": {"input_dim": 8, "hidden": [4], "num_classes": 3}}


def parse_time(value: str) -> float:
    """An API timestamp (ISO 8601, ``Z``) as Unix seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC).timestamp()


def mlp_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save(
        {
            "fc0.weight": rng.standard_normal((4, 8), dtype=np.float32),
            "fc0.bias": np.zeros(4, np.float32),
            "head.weight": rng.standard_normal((3, 4), dtype=np.float32),
            "head.bias": np.zeros(3, np.float32),
        }
    )


class Receiver:
    """A threaded HTTP server on 127.0.0.1 recording every POST: arrival time, webhook-id, signature check."""

    def __init__(self, secret: str) -> None:
        self.lock = threading.Lock()
        self.posts: list[dict[str, Any]] = []
        verifier = Webhook(secret)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def do_POST(self) -> None:  # noqa: N802 - the base class's name
                arrived = time.time()  # before reading the body: the request has arrived
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                entry: dict[str, Any] = {"time": arrived, "webhook_id": self.headers.get("webhook-id")}
                try:
                    payload = verifier.verify(body, dict(self.headers.items()))
                    entry.update(verified=True, job_id=payload["data"]["id"], type=payload["type"])
                except (WebhookVerificationError, ValueError, KeyError) as exc:
                    entry.update(verified=False, error=str(exc))
                with receiver.lock:
                    receiver.posts.append(entry)
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.posts)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stack_up(env_file: Path) -> bool:
    if not env_file.is_file():
        return False
    env = read_env_file(env_file)
    try:
        with MudscClient(env["MUDSC_API_URL"], env["MUDSC_API_KEY"], timeout=5) as client:
            client.methods()
        return True
    except (httpx.HTTPError, ApiError, KeyError):
        return False


def stats(values_s: list[float]) -> str:
    if not values_s:
        return "n/a"
    ms = sorted(v * 1000 for v in values_s)
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return f"p50 {cuts[49]:8.1f} ms  p95 {cuts[94]:8.1f} ms  max {ms[-1]:8.1f} ms  min {ms[0]:8.1f} ms  (n={len(ms)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--env-file", type=Path, default=REPO_ROOT / ".stack" / "env")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between submissions (0: back to back)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds to wait for jobs and deliveries")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if not stack_up(args.env_file):
        print("local stack not answering: make up", file=sys.stderr, flush=True)
        subprocess.run(["make", "up"], cwd=REPO_ROOT, check=True)
    env = read_env_file(args.env_file)
    secret = env.get("MUDSC_WEBHOOK_SECRET")
    if not secret:
        print(f"{args.env_file} has no MUDSC_WEBHOOK_SECRET (restart the stack: make down && make up)", file=sys.stderr)
        return 2

    receiver = Receiver(secret)
    hook_url = f"http://127.0.0.1:{receiver.port}/hook"
    run = f"whlat-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    s3 = s3_client(env)
    bucket = env["MUDSC_MODELS_BUCKET"]
    uris = []
    for label, seed in (("a", 1), ("b", 2)):
        key = f"{run}/{label}.safetensors"
        s3.put_object(Bucket=bucket, Key=key, Body=mlp_bytes(seed))
        uris.append(f"s3://{bucket}/{key}")

    load_before = os.getloadavg()
    spec = {
        "method": {"name": "weight_average"},
        "architecture": ARCHITECTURE,
        "models": [{"uri": uri} for uri in uris],
        "webhook": {"url": hook_url},
    }
    client = MudscClient(env["MUDSC_API_URL"], env["MUDSC_API_KEY"], timeout=30)
    started = time.monotonic()
    ids: list[str] = []
    throttled = 0
    for i in range(args.jobs):
        body = {**spec, "labels": {"bench": "webhook_latency", "run": run, "i": str(i)}}
        while True:  # the tenant's cap on active jobs answers 429: wait, resubmit with the same key
            try:
                job = client.submit(body, f"{run}-{i}")
                break
            except ApiError as exc:
                if exc.status != 429 or time.monotonic() - started > args.timeout:
                    raise
                throttled += 1
                time.sleep(0.2)
        ids.append(job["id"])
        if args.interval:
            time.sleep(args.interval)
    submit_s = time.monotonic() - started

    # Wait for every job to be terminal, then for every delivery to finish (delivered / failed / disabled).
    deadline = time.monotonic() + args.timeout
    jobs: dict[str, dict[str, Any]] = {}
    while len(jobs) < len(ids) and time.monotonic() < deadline:
        for job_id in ids:
            if job_id not in jobs:
                job = client.get(job_id)
                if job["status"] in TERMINAL:
                    jobs[job_id] = job
        if len(jobs) < len(ids):
            time.sleep(0.5)
    jobs_s = time.monotonic() - started
    deliveries: dict[str, dict[str, Any]] = {}
    while len(deliveries) < len(jobs) and time.monotonic() < deadline:
        for job_id in jobs:
            if job_id not in deliveries:
                listing = client.webhook_deliveries(job_id)
                delivery = listing.get("delivery")
                if delivery and delivery["status"] in {"delivered", "failed", "disabled"}:
                    deliveries[job_id] = listing
        if len(deliveries) < len(jobs):
            time.sleep(0.5)
    time.sleep(1.0)  # let a late duplicate, if any, reach the receiver
    load_after = os.getloadavg()
    posts = receiver.snapshot()
    receiver.stop()
    client.close()

    first_attempt: list[float] = []
    arrival: list[float] = []
    arrival_after_attempt: list[float] = []
    by_id: dict[str, list[dict[str, Any]]] = {}
    for post in posts:
        by_id.setdefault(str(post["webhook_id"]), []).append(post)
    once = 0
    retried = 0
    for job_id, job in jobs.items():
        finished = parse_time(job["finished_at"])
        listing = deliveries.get(job_id)
        attempts = listing["data"] if listing else []
        if listing and listing["delivery"]["attempts"] > 1:
            retried += 1
        if attempts and attempts[0].get("started_at"):
            first_attempt.append(parse_time(attempts[0]["started_at"]) - finished)
        webhook_id = listing["delivery"]["webhook_id"] if listing else f"msg_{job_id}_{job['status']}"
        got = by_id.get(webhook_id, [])
        if got:
            arrival.append(min(p["time"] for p in got) - finished)
            if attempts and attempts[0].get("started_at"):
                arrival_after_attempt.append(min(p["time"] for p in got) - parse_time(attempts[0]["started_at"]))
        if len(got) == 1 and got[0]["verified"]:
            once += 1

    statuses = [job["status"] for job in jobs.values()]
    say(f"webhook delivery latency, {len(ids)} weight_average jobs (tiny MLP, no calibration), run {run}")
    say(f"stack: {env['MUDSC_API_URL']}; receiver {hook_url} (in-process, verifies with standardwebhooks)")
    say(
        f"submitted in {submit_s:.1f}s ({args.interval}s apart; {throttled} 429s from the tenant's active-job cap, "
        f"resubmitted 0.2s later), all terminal after {jobs_s:.1f}s: "
        + ", ".join(f"{s} {statuses.count(s)}" for s in sorted(set(statuses)))
        + (f"; NOT terminal {len(ids) - len(jobs)}" if len(jobs) < len(ids) else "")
    )
    say(f"deliveries finished: {len(deliveries)}/{len(jobs)}; with more than one attempt: {retried}")
    say("")
    say(f"first attempt - finished_at : {stats(first_attempt)}")
    say(f"arrival       - finished_at : {stats(arrival)}")
    say(f"arrival       - first attempt started_at: {stats(arrival_after_attempt)}")
    say("")
    say(
        f"receiver: {len(posts)} POSTs, {len(by_id)} distinct webhook-ids, "
        f"{sum(not p['verified'] for p in posts)} failed signature checks"
    )
    say(f"delivered exactly once (by webhook-id, signature verified): {once}/{len(ids)}")
    say(
        f"load average (1/5/15 min): before {'/'.join(f'{x:.2f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
    )
    if args.out:
        header = [
            f"$ PYTHONPATH=. .venv/bin/python -m bench.webhook_latency {' '.join(argv or sys.argv[1:])}".rstrip(),
            f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
            "",
        ]
        args.out.write_text("\n".join(header + lines) + "\n")
    complete = len(jobs) == len(ids) and len(deliveries) == len(ids)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
