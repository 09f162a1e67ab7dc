"""A mergekit user's round trip: a mergekit YAML posted as ``application/yaml`` runs as its translated job.

A tiny random Llama base and two fine-tunes (bf16 folders with tokenizers, as in test_hf_results.py) go to S3;
a TIES configuration with per-model densities and a layer gradient is posted as YAML through the real API
to the real worker. The job's ``spec`` must be the translation (``from_mergekit``) and the downloaded
result must equal what the core writes for that spec on the same folders; a YAML we cannot honour is a
422 naming the key.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file

from mudsc_core.files import LocalInputs, merge_files
from mudsc_core.schema.mergekit import from_mergekit_yaml
from tests.integration.test_hf_results import _llama, _tokenizer, _upload

RUN = uuid.uuid4().hex[:8]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _post_yaml(stack_client: Any, text: str) -> httpx.Response:
    return stack_client._http.post("/v1/merges", content=text.encode(), headers={"Content-Type": "application/yaml"})


def test_a_mergekit_yaml_runs_as_its_translation(stack: Any, stack_client: Any, tmp_path: Path) -> None:
    s3, bucket = stack.s3_client(), stack.buckets["models"]
    base = _llama(0)
    uris = {"base": _upload(s3, bucket, f"mk-{RUN}/base/", base, _tokenizer(), tmp_path)}
    for i in (1, 2):
        uris[f"ft{i}"] = _upload(s3, bucket, f"mk-{RUN}/ft{i}/", _llama(i, base.float()), _tokenizer(), tmp_path)
    text = f"""
merge_method: ties
base_model: {uris["base"]}
models:
  - model: {uris["ft1"]}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {uris["ft2"]}
    parameters: {{weight: 0.5, density: [0.3, 0.9]}}
parameters: {{lambda: 0.9, normalize: true, int8_mask: true}}
dtype: bfloat16
tokenizer_source: {uris["ft2"]}
"""
    response = _post_yaml(stack_client, text)
    assert response.status_code == 202, response.text
    job = response.json()
    expected = from_mergekit_yaml(text)
    translated = expected.model_dump(mode="json")
    translated["output"]["uri"] = job["spec"]["output"]["uri"]  # the service fills in the results prefix
    assert job["spec"] == translated
    assert job["spec"]["output"]["tokenizer_source"] == 1
    finished = stack_client.wait(job["id"], timeout=300)
    assert finished["status"] == "succeeded", finished.get("error")
    downloaded = tmp_path / "result"
    stack_client.download(job["id"], downloaded)

    local = {uri: tmp_path / f"mk-{RUN}/{name}/".strip("/").replace("/", "_") for name, uri in uris.items()}
    core = tmp_path / "core"
    merge_files(
        expected,
        LocalInputs(models=[local[m.uri] for m in expected.models], base_model=local[uris["base"]]),
        core,
        device="cpu",
    )
    ours, theirs = _tensors(downloaded), _tensors(core)
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert "merge_method: ties" in (downloaded / "README.md").read_text()


def test_a_mergekit_yaml_we_cannot_honour_is_a_422_naming_the_key(stack_client: Any) -> None:
    response = _post_yaml(
        stack_client,
        "merge_method: ties\nbase_model: s3://models/x/\nslices: []\nmodels: [{model: s3://models/a/}]\n",
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "validation_error" and ["body", "slices"] in [e["loc"] for e in problem["errors"]]
    response = _post_yaml(stack_client, "merge_method: [")
    assert response.status_code == 422 and "not valid YAML" in response.json()["detail"]
