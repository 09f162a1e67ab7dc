"""Load test of the API and the job store: 1,000 concurrent submissions, polled to the end, every job accounted for.

    python -m bench.load [--jobs 1000] [--concurrency 64] [--read-seconds 10] [--attach .stack]

Starts its own local stack (Redis, SeaweedFS, one API process; no worker unless ``--worker``) unless
``--attach`` names a running one. What it does:

1. submits ``--jobs`` merge jobs concurrently, each with its own ``Idempotency-Key``; a client retries a
   submission (same key, same body) on connection errors, 5xx and 429, with backoff;
2. re-submits a tenth of them again with their keys (a client that never saw the answer): each must answer
   200 with the original job id;
3. drives every job to a terminal state: without a worker (the default, to measure the API and the store
   rather than 1,000 merges on a laptop) it cancels them, queued -> canceled; with ``--worker`` a real Celery
   worker merges tiny MLPs. It polls every job until it is terminal;
4. checks the books: one job per key, the tenant's (paginated) list holds exactly those jobs, each once,
   every one terminal, the tenant's active set is empty;
5. measures status reads per second with ``--read-concurrency`` concurrent GET loops.

It prints p50/p95/p99 latencies of submissions and status reads and the request rates of each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "canceled"}


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"p50 {cuts[49] * 1000:7.1f} ms  p95 {cuts[94] * 1000:7.1f} ms  p99 {cuts[98] * 1000:7.1f} ms"


class Load:
    def __init__(self, api_url: str, api_key: str, concurrency: int) -> None:
        self.client = httpx.AsyncClient(
            base_url=api_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=concurrency),
        )
        self.gate = asyncio.Semaphore(concurrency)
        self.submit_latency: list[float] = []
        self.status_latency: list[float] = []
        self.retries = 0
        self.requests = 0

    async def request(
        self, method: str, url: str, latencies: list[float] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One request with client retries (connection errors, 5xx, 429 honouring Retry-After)."""
        for attempt in range(8):
            async with self.gate:
                started = time.perf_counter()
                try:
                    response = await self.client.request(method, url, **kwargs)
                except httpx.TransportError:
                    response = None
                elapsed = time.perf_counter() - started
                self.requests += 1
            if response is not None and response.status_code < 500 and response.status_code != 429:
                if latencies is not None:
                    latencies.append(elapsed)
                return response
            self.retries += 1
            wait = float(response.headers.get("retry-after", 0)) if response is not None else 0.0
            await asyncio.sleep(min(max(wait, 0.05 * 2**attempt), 5) * random.uniform(0.5, 1.0))
        raise RuntimeError(f"{method} {url}: no answer after retries")

    async def submit(self, body: dict[str, Any], key: str) -> tuple[int, str]:
        response = await self.request(
            "POST", "/v1/merges", self.submit_latency, json=body, headers={"Idempotency-Key": key}
        )
        if response.status_code not in (200, 202):
            raise RuntimeError(f"submission {key}: {response.status_code} {response.text[:300]}")
        return response.status_code, response.json()["id"]

    async def status(self, job_id: str) -> str:
        response = await self.request("GET", f"/v1/merges/{job_id}", self.status_latency)
        response.raise_for_status()
        return str(response.json()["status"])

    async def list_all(self) -> list[str]:
        ids: list[str] = []
        after = None
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = (await self.request("GET", "/v1/merges", params=params)).json()
            ids.extend(job["id"] for job in page["data"])
            if not page["has_more"]:
                return ids
            after = ids[-1]


async def run(args: argparse.Namespace, api_url: str, api_key: str, uris: dict[str, str]) -> dict[str, Any]:
    load = Load(api_url, api_key, args.concurrency)
    run_id = uuid.uuid4().hex[:8]
    body = {
        "method": {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5, "seed": 0}},
        "architecture": {"name": "mlp", "config": {"input_dim": 8, "hidden": [8], "num_classes": 4}},
        "models": [{"uri": uris["a"]}, {"uri": uris["b"]}],
        "calibration": {"uri": uris["calib"], "tensor": "inputs", "max_samples": 16, "batch_size": 16},
    }
    keys = [f"load-{run_id}-{i}" for i in range(args.jobs)]
    report: dict[str, Any] = {"jobs": args.jobs, "concurrency": args.concurrency}

    # 1. concurrent submissions
    started = time.perf_counter()
    results = await asyncio.gather(
        *(load.submit({**body, "labels": {"load": run_id, "i": str(i)}}, key) for i, key in enumerate(keys))
    )
    submit_s = time.perf_counter() - started
    id_of = {key: job_id for key, (_, job_id) in zip(keys, results)}
    report["submit"] = {
        "seconds": round(submit_s, 2),
        "jobs_per_s": round(args.jobs / submit_s, 1),
        "latency": _percentiles(load.submit_latency),
        "client_retries": load.retries,
        "status_202": sum(code == 202 for code, _ in results),
    }

    # 2. replays: same key, same body -> 200 with the original id
    sample = random.Random(0).sample(range(args.jobs), max(1, args.jobs // 10))
    replays = await asyncio.gather(
        *(load.submit({**body, "labels": {"load": run_id, "i": str(i)}}, keys[i]) for i in sample)
    )
    replay_ok = all(code == 200 and job_id == id_of[keys[i]] for i, (code, job_id) in zip(sample, replays))

    # 3. to the end: cancel (no worker) and poll until every job is terminal
    if not args.worker:
        started = time.perf_counter()
        await asyncio.gather(*(load.request("POST", f"/v1/merges/{job_id}/cancel") for job_id in id_of.values()))
        report["cancel_per_s"] = round(args.jobs / (time.perf_counter() - started), 1)
    started = time.perf_counter()
    pending = set(id_of.values())
    polls = 0
    deadline = time.monotonic() + args.poll_timeout
    final: dict[str, str] = {}
    while pending and time.monotonic() < deadline:
        statuses = await asyncio.gather(*(load.status(job_id) for job_id in pending))
        polls += len(statuses)
        for job_id, status in zip(list(pending), statuses):
            if status in TERMINAL:
                final[job_id] = status
        pending -= set(final)
        if pending:
            await asyncio.sleep(0.5)
    poll_s = time.perf_counter() - started
    report["poll"] = {
        "seconds": round(poll_s, 2),
        "status_reads": polls,
        "reads_per_s": round(polls / poll_s, 1),
        "latency": _percentiles(load.status_latency),
    }

    # 4. the books
    listed = await load.list_all()
    mine = [job_id for job_id in listed if job_id in set(id_of.values())]
    report["accounting"] = {
        "distinct_jobs": len(set(id_of.values())),
        "replays_returned_original": replay_ok,
        "listed_once_each": len(mine) == len(set(mine)) == args.jobs,
        "terminal": len(final),
        "still_pending": len(pending),
        "by_status": {s: list(final.values()).count(s) for s in sorted(set(final.values()))},
    }

    # 5. status reads per second, concurrent GET loops
    read_latency: list[float] = []
    ids = list(id_of.values())
    stop_at = time.monotonic() + args.read_seconds
    count = 0

    async def reader(seed: int) -> None:
        nonlocal count
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            response = await load.client.get(f"/v1/merges/{rng.choice(ids)}")
            read_latency.append(time.perf_counter() - t0)
            if response.status_code == 200:
                count += 1

    started = time.perf_counter()
    await asyncio.gather(*(reader(i) for i in range(args.read_concurrency)))
    elapsed = time.perf_counter() - started
    report["status_reads"] = {
        "concurrency": args.read_concurrency,
        "seconds": round(elapsed, 1),
        "reads_per_s": round(count / elapsed, 1),
        "latency": _percentiles(read_latency),
    }
    report["total_requests"] = load.requests
    await load.client.aclose()
    return report


def _upload_inputs(stack: Any) -> dict[str, str]:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)

    def mlp() -> bytes:
        return save(
            {
                "layers.0.weight": rng.standard_normal((8, 8), dtype=np.float32),
                "layers.0.bias": np.zeros(8, np.float32),
                "layers.1.weight": rng.standard_normal((4, 8), dtype=np.float32),
                "layers.1.bias": np.zeros(4, np.float32),
            }
        )

    s3 = stack.s3_client()
    objects = {
        "a": ("models", "load/a.safetensors", mlp()),
        "b": ("models", "load/b.safetensors", mlp()),
        "calib": ("data", "load/calib.safetensors", save({"inputs": rng.standard_normal((16, 8), dtype=np.float32)})),
    }
    for bucket, key, blob in objects.values():
        s3.put_object(Bucket=stack.buckets[bucket], Key=key, Body=blob)
    return {name: f"s3://{stack.buckets[bucket]}/{key}" for name, (bucket, key, _) in objects.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--read-concurrency", type=int, default=32)
    parser.add_argument("--read-seconds", type=float, default=10.0)
    parser.add_argument("--poll-timeout", type=float, default=600.0)
    parser.add_argument("--worker", action="store_true", help="run a real worker (tiny merges) instead of canceling")
    parser.add_argument("--attach", help="root of a stack started with `python -m scripts.localstack up`")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts.localstack import LocalStack

    overrides = {"MUDSC_LIMITS__MAX_CONCURRENT_JOBS_PER_TENANT": str(args.jobs * 2)}
    if args.attach:
        stack = LocalStack.attach(args.attach)
        api_url, owned = stack.api_url, None
    else:
        owned = LocalStack(Path(tempfile.mkdtemp(prefix="mudsc-load-")))
        owned.start(worker=False, api=False)
        stack = owned
    try:
        if owned is not None:
            api_url, _ = stack.start_api(overrides, name="api")
            if args.worker:
                stack.start_worker("w1", env_overrides=overrides)
        uris = _upload_inputs(stack)
        report = asyncio.run(run(args, api_url, stack.api_key, uris))
    finally:
        if owned is not None:
            owned.stop()
    print(
        f"jobs {report['jobs']}, client concurrency {report['concurrency']}, "
        f"mode {'real worker' if args.worker else 'no worker: cancel'}"
    )
    print(
        f"submit   {report['submit']['seconds']:7.2f} s  {report['submit']['jobs_per_s']:7.1f} jobs/s  "
        f"{report['submit']['latency']}  client retries {report['submit']['client_retries']}"
    )
    if "cancel_per_s" in report:
        print(f"cancel   {report['cancel_per_s']:7.1f} jobs/s")
    print(
        f"poll     {report['poll']['seconds']:7.2f} s  {report['poll']['reads_per_s']:7.1f} reads/s  "
        f"{report['poll']['latency']}"
    )
    print(
        f"reads    {report['status_reads']['reads_per_s']:7.1f} status reads/s with "
        f"{report['status_reads']['concurrency']} concurrent GET loops over "
        f"{report['status_reads']['seconds']} s  {report['status_reads']['latency']}"
    )
    print("accounting " + json.dumps(report["accounting"]))
    print(f"total requests {report['total_requests']}")
    books = report["accounting"]
    ok = (
        books["replays_returned_original"]
        and books["listed_once_each"]
        and books["still_pending"] == 0
        and books["distinct_jobs"] == report["jobs"]
    )
    print("OK: every job accounted for exactly once" if ok else "FAILED: the books do not balance")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
