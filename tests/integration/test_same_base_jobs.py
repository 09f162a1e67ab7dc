"""Same-base methods through the service: task vectors from the digits test bed, every method.

The base and four fine-tuned MLP bodies (bench/task_vectors.py) are uploaded as Hugging Face
model folders (config.json + sharded safetensors + index); each method runs as a job on the
real worker; the merged folder is downloaded through presigned URLs, must equal the core's
direct output for the same inputs, and must beat the base model on every task.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from bench import task_vectors as tv
from mudsc_client.client import ApiError
from mudsc_core.io import ShardWriter, load_state_dict
from mudsc_core.same_base.stream import merge_checkpoints
from mudsc_core.schema import METHODS
from scripts.localstack import upload_folder

RUN = uuid.uuid4().hex[:8]
# lambda per method: the value the bench's validation-split search picks (docs/same_base_methods.md).
PARAMS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties": {"density": 0.2, "scaling_factor": 0.5},
    "dare_linear": {"density": 0.5, "scaling_factor": 0.3},
    "dare_ties": {"density": 0.5, "scaling_factor": 0.3},
    "breadcrumbs": {"scaling_factor": 0.3},
    "breadcrumbs_ties": {"scaling_factor": 0.5},
    "della": {"scaling_factor": 0.7},
    "della_linear": {"scaling_factor": 0.3},
    "slerp": {"t": 0.5},
    "multislerp": {},
    "model_stock": {},
    "nuslerp": {},
    "karcher": {},
    "sce": {"select_topk": 0.5},
    # t swept on this bed: 0.01 keeps the first model, >= 0.1 the second; 0.03 trades entries about evenly
    "nearswap": {"t": 0.03},
    "tsv_merge": {"scaling_factor": 1.0},
    "iso_c": {"scaling_factor": 1.0},
    "iso_cts": {"scaling_factor": 1.0},
}


def test_every_same_base_method_is_tested_here() -> None:
    # passthrough is excluded: it stacks layer ranges (the job's slices), so on this bed (MLP bodies of
    # one depth, scored against the base) it would only return one model's layers; test_passthrough covers it.
    assert set(PARAMS) == {
        name for name, info in METHODS.items() if info.family == "same_base" and name != "passthrough"
    }


def _upload_folder(s3: Any, bucket: str, prefix: str, state: dict[str, torch.Tensor], work: Path) -> str:
    folder = work / prefix.strip("/").replace("/", "_")
    writer = ShardWriter(folder, "float32", 40 * 1024)  # ~100 KB body -> several shards + index
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.close()
    (folder / "config.json").write_text(json.dumps({"model_type": "digits-mlp", "hidden_size": 128}))
    return upload_folder(s3, bucket, prefix, folder)


@pytest.fixture(scope="module")
def bed_and_uris(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, str], Path]:
    bed = tv.build(seed=0)
    work = tmp_path_factory.mktemp("task_vectors")
    s3, bucket = stack.s3_client(), stack.buckets["models"]
    uris = {"base": _upload_folder(s3, bucket, f"tv-{RUN}/base/", bed.base, work)}
    for task in tv.TASKS:
        uris[task] = _upload_folder(s3, bucket, f"tv-{RUN}/{task}/", bed.finetuned[task], work)
    assert len(list((work / f"tv-{RUN}_base").glob("model-*.safetensors"))) > 1  # really sharded
    return bed, uris, work


def _submit_respecting_the_tenant_limit(client: Any, spec: dict[str, Any]) -> str:
    """A well-behaved client: on 429 (too many jobs in flight) wait and retry."""
    deadline = time.monotonic() + 600
    while True:
        try:
            return client.submit(spec)["id"]
        except ApiError as exc:
            if exc.status != 429 or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@pytest.fixture(scope="module")
def jobs(stack_client: Any, bed_and_uris: tuple[Any, dict[str, str], Path]) -> dict[str, dict[str, Any]]:
    """Submit every method at once (the worker drains them), then wait for all."""
    _, uris, _ = bed_and_uris
    submitted = {}
    for method, params in PARAMS.items():
        info = METHODS[method]
        tasks = tv.TASKS[:2] if info.max_models == 2 else tv.TASKS
        spec: dict[str, Any] = {
            "method": {"name": method, "params": params},
            "models": [{"uri": uris[t]} for t in tasks],
            "labels": {"run": RUN},
        }
        if info.requires_base:
            spec["base_model"] = {"uri": uris["base"]}
        submitted[method] = _submit_respecting_the_tenant_limit(stack_client, spec)
    return {method: stack_client.wait(job_id, timeout=600) for method, job_id in submitted.items()}


@pytest.mark.parametrize("method", sorted(PARAMS))
def test_method_through_the_service(
    method: str, jobs: dict[str, dict[str, Any]], stack_client: Any, bed_and_uris: tuple[Any, dict[str, str], Path]
) -> None:
    bed, _, work = bed_and_uris
    job = jobs[method]
    assert job["status"] == "succeeded", job.get("error")
    names = {artifact["name"] for artifact in job["result"]["artifacts"]}
    assert {"config.json", "README.md", "spec.json"} <= names
    assert "model.safetensors" in names or "model.safetensors.index.json" in names

    with tempfile.TemporaryDirectory() as tmp:
        downloaded = Path(tmp) / "out"
        stack_client.download(job["id"], downloaded)
        merged = load_state_dict(downloaded)
        card = (downloaded / "README.md").read_text()
        assert method in card

        # The same inputs merged directly by the core give the same numbers.
        info = METHODS[method]
        tasks = tv.TASKS[:2] if info.max_models == 2 else tv.TASKS
        direct = Path(tmp) / "direct"
        merge_checkpoints(
            method,
            info.params.model_validate(PARAMS[method]),
            [work / f"tv-{RUN}_{t}" for t in tasks],
            work / f"tv-{RUN}_base" if info.requires_base else None,
            [1.0] * len(tasks),
            direct,
            dtype="float32",
            shard_size_bytes=2**30,
        )
        expected = load_state_dict(direct)
    assert merged.keys() == expected.keys()
    for name in expected:
        assert_close(merged[name], expected[name], rtol=0, atol=0, msg=name)

    base = tv.accuracies(bed, bed.base)
    scores = tv.accuracies(bed, merged)
    if METHODS[method].max_models == 2:  # slerp, nearswap: two of the four tasks only
        assert all(scores[t] > base[t] for t in tasks), (scores, base)
    else:
        assert all(scores[t] > base[t] for t in tv.TASKS), (scores, base)
