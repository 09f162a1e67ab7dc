"""End-to-end demo: two digit classifiers trained from different seeds, merged by the service.

1. trains model A and model B (same architecture, different seeds) on scikit-learn's bundled 8x8 digits;
2. uploads both checkpoints and a calibration set (``inputs``: training images) as safetensors to S3;
3. submits a ``mudsc`` merge job and a ``weight_average`` job through the REST API (``mudsc_client.client``);
4. follows the MuDSC job's progress from its Server-Sent Events stream;
5. downloads the merged checkpoints through their presigned URLs and prints the test accuracy of
   A, B, plain weight averaging and MuDSC.

Needs a running stack: ``make up`` (or ``python -m scripts.localstack up``); ``make demo`` does both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO_ROOT))

import boto3  # noqa: E402
import torch  # noqa: E402
from botocore.config import Config  # noqa: E402
from safetensors.torch import load_file, save  # noqa: E402

from bench.testbed import accuracy, inputs_for, load_digits_data, train  # noqa: E402
from mudsc_client.cli import watch  # noqa: E402
from mudsc_client.client import MudscClient, read_env_file  # noqa: E402

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mlp": {"name": "mlp", "config": {"input_dim": 64, "hidden": [128, 128], "num_classes": 10}},
    "resnet": {"name": "resnet", "config": {"depth": 8, "width": 2, "num_classes": 10, "in_channels": 1}},
}


def s3_client(env: dict[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=env["MUDSC_S3_ENDPOINT"],
        region_name=env.get("MUDSC_S3_REGION", "us-east-1"),
        aws_access_key_id=env["MUDSC_S3_ACCESS_KEY"],
        aws_secret_access_key=env["MUDSC_S3_SECRET_KEY"],
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every safetensors file the job produced (one file, or the shards of an index)."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    paths = [folder / f for f in files] if files else sorted(folder.glob("*.safetensors"))
    if not paths:
        raise SystemExit(f"no safetensors artifact in {folder}: {sorted(p.name for p in folder.iterdir())}")
    state: dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(load_file(path))
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-file", default=str(REPO_ROOT / ".stack" / "env"))
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mlp")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--out", default=str(REPO_ROOT / ".demo"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give

    env_path = Path(args.env_file)
    if not env_path.exists():
        print(f"{env_path} is missing: start the stack first (make up)", file=sys.stderr)
        return 2
    env = read_env_file(env_path)
    architecture = ARCHITECTURES[args.arch]
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()

    # 1. Train.
    data = load_digits_data()
    states = []
    for label, seed in zip("AB", args.seeds):
        t0 = time.monotonic()
        states.append(train(architecture, data.x_train, data.y_train, seed=seed, epochs=args.epochs))
        print(f"trained model {label} (seed {seed}) in {time.monotonic() - t0:.1f}s")

    # 2. Upload checkpoints and calibration inputs.
    s3 = s3_client(env)
    models_bucket, data_bucket = env["MUDSC_MODELS_BUCKET"], env["MUDSC_DATA_BUCKET"]
    model_uris = []
    for label, state in zip("ab", states):
        key = f"{run}/{label}.safetensors"
        s3.put_object(Bucket=models_bucket, Key=key, Body=save({k: v.contiguous() for k, v in state.items()}))
        model_uris.append(f"s3://{models_bucket}/{key}")
    calibration = inputs_for(architecture, data.x_train[: args.calibration_samples]).contiguous()
    calib_key = f"{run}/calibration.safetensors"
    s3.put_object(Bucket=data_bucket, Key=calib_key, Body=save({"inputs": calibration}))
    print(f"uploaded {', '.join(model_uris)} and s3://{data_bucket}/{calib_key} (inputs {tuple(calibration.shape)})")

    # 3. Submit the merges.
    common = {
        "models": [{"uri": uri} for uri in model_uris],
        "architecture": architecture,
        "calibration": {
            "uri": f"s3://{data_bucket}/{calib_key}",
            "tensor": "inputs",
            "max_samples": args.calibration_samples,
            "batch_size": 128,
        },
        "labels": {"demo": run},
    }
    with MudscClient(env["MUDSC_API_URL"], env["MUDSC_API_KEY"]) as client:
        jobs = {
            "MuDSC (zip)": client.submit(
                {"method": {"name": "mudsc", "params": {"mode": "zip"}}, **common}, idempotency_key=f"{run}-mudsc"
            ),
            "weight average": client.submit(
                {"method": {"name": "weight_average", "params": {}}, **common}, idempotency_key=f"{run}-avg"
            ),
        }
        for name, job in jobs.items():
            print(f"submitted {name}: {job['id']} ({job['status']})")

        # 4. Progress of the MuDSC job from its SSE stream, then wait for the other one.
        finished = {}
        t0 = time.monotonic()
        finished["MuDSC (zip)"] = watch(client, jobs["MuDSC (zip)"]["id"])
        print(f"MuDSC job {finished['MuDSC (zip)']['status']} in {time.monotonic() - t0:.1f}s")
        finished["weight average"] = client.wait(jobs["weight average"]["id"], timeout=args.timeout)
        failed = {name: job for name, job in finished.items() if job["status"] != "succeeded"}
        if failed:
            for name, job in failed.items():
                print(f"{name} job {job['id']} {job['status']}: {json.dumps(job.get('error'))}", file=sys.stderr)
            return 1

        # 5. Download through presigned URLs and evaluate.
        scores = {
            f"model {label}": accuracy(architecture, state, data.x_test, data.y_test)
            for label, state in zip("AB", states)
        }
        for name in ("weight average", "MuDSC (zip)"):
            job = finished[name]
            folder = Path(args.out) / job["id"]
            paths = client.download(job["id"], folder)
            print(f"downloaded {name}: {', '.join(p.name for p in paths)} -> {folder}")
            scores[name] = accuracy(architecture, load_checkpoint(folder), data.x_test, data.y_test)

    print(f"\ntest accuracy on {len(data.y_test)} held-out digits ({args.arch}, {args.epochs} epochs):")
    for name, score in scores.items():
        print(f"  {name:<16} {100 * score:6.2f}%")
    metrics = finished["MuDSC (zip)"].get("result", {}).get("metrics", {})
    if metrics:
        print(f"MuDSC job metrics: {json.dumps(metrics)[:400]}")
    print(f"demo finished in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
