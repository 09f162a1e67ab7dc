"""Second demo: two Hugging Face BERT classifiers trained from different seeds, merged by MuDSC through the API.

1. trains two ``BertForSequenceClassification`` models (2 layers, width 64; built from a config, nothing
   downloaded) on the 8x8 digits read as token sequences (``tests/transformer_testbed.py``), from seeds 1 and 2;
2. saves each as a Hugging Face folder (``save_pretrained``: config.json + model.safetensors) and uploads
   the folders and a calibration file of forward keywords (``input_ids``, ``attention_mask``, int64) to S3;
3. submits a ``weight_average`` job, a ``mudsc`` zip job and a ``mudsc`` zip job with REPAIR, each with
   ``"architecture": {"name": "transformers"}`` (the worker builds the model from config.json and derives its
   permutation spec by tracing);
4. downloads the results, loads each with ``from_pretrained`` and prints the held-out accuracy of A, B and
   every merge. Separately trained transformers are hard to merge without training: expect the merges well
   below the models (docs/mudsc_transformers.md has the test bed's numbers).

Needs a running stack: ``make up``; ``make demo`` runs this after the first demo.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mudsc_client.client import MudscClient, read_env_file  # noqa: E402
from scripts.demo import s3_client  # noqa: E402
from scripts.localstack import upload_folder  # noqa: E402
from tests import transformer_testbed as bed  # noqa: E402

FAMILY = "bert"


def _accuracy(model: torch.nn.Module, data: bed.Digits) -> float:
    batch = bed.inputs(FAMILY, data, "test")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=1)
    return float((predicted == data.y_test).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env-file", default=str(REPO_ROOT / ".stack" / "env"))
    parser.add_argument("--seeds", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=bed.EPOCHS)
    parser.add_argument("--out", default=str(REPO_ROOT / ".demo"))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    env_path = Path(args.env_file)
    if not env_path.exists():
        print(f"{env_path} is missing: start the stack first (make up)", file=sys.stderr)
        return 2
    env = read_env_file(env_path)
    import transformers

    run = f"demo-hf-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    data = bed.load_digits()

    # 1-2. Train, save as Hugging Face folders, upload with the calibration inputs.
    s3 = s3_client(env)
    models_bucket, data_bucket = env["MUDSC_MODELS_BUCKET"], env["MUDSC_DATA_BUCKET"]
    scores: dict[str, float] = {}
    uris = []
    with tempfile.TemporaryDirectory() as work:
        for label, seed in zip("AB", args.seeds):
            t0 = time.monotonic()
            model = bed.build(FAMILY)
            model.load_state_dict(bed.train(FAMILY, data, seed=seed, epochs=args.epochs))
            model.eval()
            scores[f"model {label}"] = _accuracy(model, data)
            folder = Path(work) / label
            model.save_pretrained(folder)
            uris.append(upload_folder(s3, models_bucket, f"{run}/{label}/", folder))
            print(f"trained BERT {label} (seed {seed}) in {time.monotonic() - t0:.1f}s -> {uris[-1]}")
        calibration = bed.calibration(FAMILY, data)
        save_file({k: v.contiguous() for k, v in calibration.items()}, Path(work) / "calibration.safetensors")
        calib_key = f"{run}/calibration.safetensors"
        s3.upload_file(str(Path(work) / "calibration.safetensors"), data_bucket, calib_key)
    shapes = {name: tuple(t.shape) for name, t in calibration.items()}
    print(f"uploaded s3://{data_bucket}/{calib_key} ({shapes})")

    # 3. Submit.
    common = {
        "models": [{"uri": uri} for uri in uris],
        "architecture": {"name": "transformers"},
        "calibration": {"uri": f"s3://{data_bucket}/{calib_key}", "batch_size": 64},
        "labels": {"demo": run},
    }
    names = {
        "weight average": ("weight_average", {}),
        "MuDSC (zip)": ("mudsc", {"mode": "zip"}),
        "MuDSC + REPAIR": ("mudsc", {"mode": "zip", "repair": True}),
    }
    with MudscClient(env["MUDSC_API_URL"], env["MUDSC_API_KEY"]) as client:
        jobs = {
            name: client.submit(
                {"method": {"name": method, "params": params}, **common},
                idempotency_key=f"{run}-{name.replace(' ', '')}",
            )
            for name, (method, params) in names.items()
        }
        for name, job in jobs.items():
            print(f"submitted {name}: {job['id']} ({job['status']})")
        finished = {name: client.wait(job["id"], timeout=args.timeout) for name, job in jobs.items()}
        failed = {name: job for name, job in finished.items() if job["status"] != "succeeded"}
        for name, job in failed.items():
            print(f"{name} job {job['id']} {job['status']}: {json.dumps(job.get('error'))}", file=sys.stderr)
        if failed:
            return 1

        # 4. Download, load with from_pretrained, evaluate.
        for name in names:
            job = finished[name]
            folder = Path(args.out) / job["id"]
            paths = client.download(job["id"], folder)
            print(f"downloaded {name}: {', '.join(p.name for p in paths)} -> {folder}")
            merged = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
            scores[name] = _accuracy(merged, data)

    print(f"\nheld-out accuracy on {len(data.y_test)} digits read as 16 tokens (BERT, 2 layers, width 64):")
    for name, score in scores.items():
        print(f"  {name:<16} {100 * score:6.2f}%")
    metrics = finished["MuDSC (zip)"]["result"]["metrics"]
    print(f"MuDSC job: self-check error {metrics['self_check_max_rel_error']:.1e}, timings {metrics['timings_s']}")
    print(f"demo finished in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
