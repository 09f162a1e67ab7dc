"""LoRA adapters as inputs through the real stack: base and PEFT adapter folders in S3, a same-base job.

The tiny Llama base and its adapters are the unit test's (``tests/unit/test_lora_inputs.py``); the job's
result must equal the core's ``merge_files`` on the same local folders, and an adapter made for another
base is refused at submission with a 422 naming the tensor.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mudsc_client.client import ApiError
from scripts.localstack import upload_folder

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tests.unit.test_lora_inputs import llama, make_adapter  # noqa: E402

RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def uploaded(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("lora-jobs")
    llama(0).save_pretrained(work / "base")
    llama(7, hidden=48).save_pretrained(work / "other_base")
    make_adapter(work / "base", work / "a1", 1)
    make_adapter(work / "base", work / "a2", 2, r=2, lora_alpha=5, use_rslora=True)
    make_adapter(work / "other_base", work / "foreign", 3)
    s3, bucket = stack.s3_client(), stack.buckets["models"]
    uris = {
        name: upload_folder(s3, bucket, f"lora-{RUN}/{name}/", work / name) for name in ("base", "a1", "a2", "foreign")
    }
    return work, uris


def _spec(uris: dict[str, str], adapters: tuple[str, str]) -> dict[str, Any]:
    return {
        "method": {"name": "task_arithmetic", "params": {"scaling_factor": 1.0}},
        "models": [
            {"uri": uris["base"], "lora": {"uri": uris[adapters[0]]}},
            {"uri": uris["base"], "lora": {"uri": uris[adapters[1]]}, "weight": 0.5},
        ],
        "base_model": {"uri": uris["base"]},
        "labels": {"run": RUN},
    }


def test_a_lora_job_equals_the_cores_merge(
    stack_client: Any, uploaded: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from mudsc_core.files import LocalInputs, merge_files
    from mudsc_core.schema import JobSpec

    work, uris = uploaded
    spec = _spec(uris, ("a1", "a2"))
    job = stack_client.submit(spec)
    finished = stack_client.wait(job["id"], timeout=300)
    assert finished["status"] == "succeeded", finished.get("error")
    assert finished["spec"]["models"][0]["lora"] == {"uri": uris["a1"]}
    stack_client.download(job["id"], tmp_path / "job")

    base = work / "base"
    inputs = LocalInputs(models=[base, base], base_model=base, loras=[work / "a1", work / "a2"])
    merge_files(JobSpec.model_validate(spec), inputs, tmp_path / "core", device="cpu")
    got, want = load_file(tmp_path / "job" / "model.safetensors"), load_file(tmp_path / "core" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_an_adapter_for_another_base_is_a_422_naming_the_tensor(
    stack_client: Any, uploaded: tuple[Path, dict[str, str]]
) -> None:
    _, uris = uploaded
    with pytest.raises(ApiError) as caught:
        stack_client.submit(_spec(uris, ("a1", "foreign")))
    assert caught.value.status == 422
    assert caught.value.problem["code"] == "invalid_checkpoint"
    detail = caught.value.problem["detail"]
    assert detail.startswith(uris["foreign"])
    assert "q_proj.lora_A.weight' has shape [4, 48], expected [4, 32]" in detail
    assert caught.value.problem["errors"][0]["loc"] == ["body", "models", 1, "lora", "uri"]
