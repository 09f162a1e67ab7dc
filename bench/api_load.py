"""The API's read rate and a job's latency to `running`, on a local stack of its own.

    python -m bench api_load            # or: python -m bench.api_load [--seconds 10] [--connections 32] [--jobs 10]

Starts a stack (Redis, SeaweedFS, one uvicorn API process, one Celery merge worker with one pool
process) under a temporary folder, then:

1. **reads**: ``wrk`` (Debian's; ``scripts/ensure_deps.sh wrk`` installs it) against
   ``GET /v1/merges/{id}`` of a finished job with a valid key, ``--connections`` connections,
   two threads, ``--seconds`` seconds, on loopback: requests per second, p50 / p99 latency.
   Repeated ``--repeats`` times; the median run is reported. Target: >= 1,000 reads/s.
2. **submission -> running**: ``--jobs`` tiny merges submitted one after another to the idle
   worker; per job ``started_at - created_at`` from the job record (both stamped by the
   server, milliseconds). Target: p50 < 50 ms.
3. **first vs second job**: a fresh worker (a new process) gets two jobs one after the other;
   the time from submission to ``succeeded`` of each. Target: the first no slower than the
   second (its pool process imported torch and opened its connections at start).

Every figure is printed with the load average of the machine (this benchmark shares it with
whatever else runs).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
READS_TARGET, RUNNING_TARGET_MS = 1000.0, 50.0
MLP = {"input_dim": 8, "hidden": [8], "num_classes": 4}


def _ms(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000


def _wrk_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, key: str, connections: int, seconds: float) -> dict[str, float]:
    proc = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", f"Authorization: Bearer {key}", url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = proc.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _wrk_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _wrk_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non_2xx or errors:
        raise SystemExit(f"wrk saw failures:\n{out}")
    return {"reads_per_s": rate, "p50_ms": p50, "p99_ms": p99}


def _upload(stack: Any) -> dict[str, str]:
    """Two tiny MLP checkpoints (the built-in ``mlp``'s names) and a calibration file, into the stack's S3."""
    import torch
    from safetensors.torch import save

    from mudsc_core import build_model

    objects = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        state = build_model({"name": "mlp", "config": MLP}).state_dict()
        objects[name] = ("models", f"api-load/{name}.safetensors", save({k: v.contiguous() for k, v in state.items()}))
    calibration = save({"inputs": torch.randn(16, MLP["input_dim"], generator=torch.Generator().manual_seed(0))})
    objects["calib"] = ("data", "api-load/calib.safetensors", calibration)
    s3 = stack.s3_client()
    for bucket, key, blob in objects.values():
        s3.put_object(Bucket=stack.buckets[bucket], Key=key, Body=blob)
    return {name: f"s3://{stack.buckets[bucket]}/{key}" for name, (bucket, key, _) in objects.items()}


def _body(uris: dict[str, str], i: int) -> dict[str, Any]:
    return {
        "method": {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5, "seed": 0}},
        "architecture": {"name": "mlp", "config": MLP},
        "models": [{"uri": uris["a"]}, {"uri": uris["b"]}],
        "calibration": {"uri": uris["calib"], "tensor": "inputs", "max_samples": 16, "batch_size": 16},
        "labels": {"bench": "api_load", "i": str(i)},
    }


def run_job(
    client: httpx.Client, uris: dict[str, str], i: int, timeout_s: float = 120.0, idle_s: float = 1.0
) -> dict[str, Any]:
    """After ``idle_s`` (the worker finishes its previous task's tail: ack, memory release), submit one job
    and poll it (every 5 ms) to the end; the job record and the client-side seconds."""
    time.sleep(idle_s)
    started = time.perf_counter()
    response = client.post("/v1/merges", json=_body(uris, i))
    response.raise_for_status()
    job_id = response.json()["id"]
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        job = client.get(f"/v1/merges/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            if job["status"] != "succeeded":
                raise SystemExit(f"job {job_id} ended {job['status']}: {job.get('error')}")
            job["client_s"] = time.perf_counter() - started
            return job
        time.sleep(0.005)
    raise SystemExit(f"job {job_id} did not finish in {timeout_s} s")


def _wait_for_log(path: Path, text: str, timeout_s: float) -> str:
    """The worker log's line containing ``text`` (its pool process's warm-up), waiting for it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in path.read_text(errors="replace").splitlines() if text in line]
        if lines:
            return lines[-1].split("] ", 1)[-1]
        time.sleep(0.1)
    return f"no {text!r} line in {timeout_s:.0f} s"


def _stage_diff(first: dict[str, Any], second: dict[str, Any]) -> str:
    """Where the first job's extra time went: its stages' seconds against the second's."""
    a, b = ((j.get("result") or {}).get("metrics", {}).get("timings_s") or {} for j in (first, second))
    stages = sorted(set(a) | set(b), key=lambda k: -(a.get(k, 0.0) - b.get(k, 0.0)))
    return ", ".join(f"{k} {a.get(k, 0.0) * 1000:.0f}/{b.get(k, 0.0) * 1000:.0f} ms" for k in stages) or "none recorded"


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} {five:.1f} {fifteen:.1f} ({os.cpu_count()} CPUs)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk duration per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="wrk runs (the median is reported)")
    parser.add_argument("--jobs", type=int, default=10, help="jobs for the submission -> running latency")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        sys.stderr.write("wrk is not installed: run scripts/ensure_deps.sh wrk\n")
        return 2

    sys.path.insert(0, str(ROOT))
    from scripts.localstack import LocalStack

    stack = LocalStack(Path(tempfile.mkdtemp(prefix="mudsc-api-load-")))
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    passed = True
    try:
        stack.start(worker=False, api=False)
        api_url, _ = stack.start_api(name="api")
        stack.start_worker("w1")
        uris = _upload(stack)
        client = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=60)
        say(f"API load: one uvicorn process, one Celery worker (one pool process), loopback; {_load()}")

        # 2. submission -> running on the idle worker (the first job also warms the worker up)
        jobs = [run_job(client, uris, i) for i in range(args.jobs + 1)][1:]
        waits = [_ms(j["started_at"]) - _ms(j["created_at"]) for j in jobs]
        wait_p50 = statistics.median(waits)
        ok = wait_p50 < RUNNING_TARGET_MS
        passed &= ok
        say(
            f"submission -> running ({len(jobs)} jobs, idle worker): p50 {wait_p50:.0f} ms, max {max(waits):.0f} ms "
            f"(target p50 < {RUNNING_TARGET_MS:.0f} ms: {'PASS' if ok else 'FAIL'}); {_load()}"
        )

        # 1. reads of one finished job
        url = f"{api_url}/v1/merges/{jobs[-1]['id']}"
        wrk(url, stack.api_key, args.connections, 2)  # warm-up
        runs = [wrk(url, stack.api_key, args.connections, args.seconds) for _ in range(args.repeats)]
        median = sorted(runs, key=lambda r: r["reads_per_s"])[len(runs) // 2]
        rates = ", ".join(f"{r['reads_per_s']:.0f}" for r in runs)
        ok = median["reads_per_s"] >= READS_TARGET
        passed &= ok
        say(
            f"reads (wrk -t2 -c{args.connections} -d{args.seconds:g}s GET /v1/merges/{{id}}, median of {len(runs)}): "
            f"{median['reads_per_s']:.0f} reads/s, p50 {median['p50_ms']:.1f} ms, p99 {median['p99_ms']:.1f} ms "
            f"(runs: {rates}; target >= {READS_TARGET:.0f}: "
            f"{'PASS' if ok else 'FAIL'}); {_load()}"
        )

        # 3. a fresh worker: first job vs second
        stack.stop_process("worker-w1")
        stack.start_worker("w2")
        warmed = _wait_for_log(stack.logs / "worker-w2.log", "warmed up", 120.0)
        first, second = run_job(client, uris, 1000), run_job(client, uris, 1001)
        ratio = first["client_s"] / second["client_s"]
        ok = ratio <= 1.25  # "as fast as": within noise of the second
        passed &= ok
        say(
            f"fresh worker: first job {first['client_s'] * 1000:.0f} ms, second {second['client_s'] * 1000:.0f} ms "
            f"submission to succeeded (ratio {ratio:.2f}; running -> finished "
            f"{_ms(first['finished_at']) - _ms(first['started_at']):.0f} / "
            f"{_ms(second['finished_at']) - _ms(second['started_at']):.0f} ms; target ratio <= 1.25: "
            f"{'PASS' if ok else 'FAIL'}; pool process warm-up: {warmed}); {_load()}"
        )
        say(f"  first / second job by stage (timings_s, largest differences first): {_stage_diff(first, second)}")
        client.close()
    finally:
        stack.stop()
        shutil.rmtree(stack.root, ignore_errors=True)
    say(f"targets: {'PASS' if passed else 'FAIL'}")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
