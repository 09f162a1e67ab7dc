"""MuDSC on Hugging Face folders through the whole stack: ``"architecture": {"name": "transformers"}``.

A tiny bf16 Llama (grouped-query attention, rotary, tied embeddings) with its tokenizer, and a copy of it
whose units were permuted (the same function, other weights), go to S3 as model folders with their
config.json; a MuDSC zip job with integer token-id calibration (padded, with an attention mask) runs on
the real worker, which builds the model from config.json and traces it. The downloaded result loads with
``from_pretrained`` (model and tokenizer), generates, and is the original model again. Folders whose
configs disagree fail the job as ``incompatible_models``; a folder without config.json and calibration
tensors of different lengths are 422s at submission.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mudsc_client.client import ApiError
from scripts.localstack import upload_folder
from tests.integration.test_hf_results import VOCAB, _tokenizer
from tests.tiny_llama import tiny_llama

transformers = pytest.importorskip("transformers")

RUN = uuid.uuid4().hex[:8]


def _llama(seed: int, **config: Any) -> Any:
    return tiny_llama(
        seed, vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, **config
    )


def _permuted_copy(model: Any) -> Any:
    from mudsc_core.architectures import trace_architecture
    from mudsc_core.permutation.permute import permute_state_dict, random_permutations

    spec = trace_architecture({"name": "transformers", "config": model.config.to_dict()}).spec
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    copy = _llama(5)
    copy.load_state_dict(permute_state_dict(spec, state, random_permutations(spec, torch.Generator().manual_seed(3))))
    return copy


def _save(model: Any, folder: Path) -> Path:
    model.to(torch.bfloat16).save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


def _calibration(samples: int = 32, tokens: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(samples, tokens, dtype=torch.int64)
    mask[1::2, 8:] = 0
    return {"input_ids": torch.randint(0, len(VOCAB), (samples, tokens), generator=generator), "attention_mask": mask}


@pytest.fixture(scope="module")
def uploaded(stack: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("hf-mudsc")
    s3, models, data = stack.s3_client(), stack.buckets["models"], stack.buckets["data"]
    original = _llama(0).to(torch.bfloat16).float()  # the values a bf16 folder holds
    folders = {
        "a": _save(original, work / "a"),
        "b": _save(_permuted_copy(original), work / "b"),
        "other": _save(_llama(1, rms_norm_eps=1e-5), work / "other"),
    }
    uris = {name: upload_folder(s3, models, f"mudsc-hf-{RUN}/{name}/", folder) for name, folder in folders.items()}
    save_file(_calibration(), work / "calib.safetensors")
    s3.upload_file(str(work / "calib.safetensors"), data, f"mudsc-hf-{RUN}/calib.safetensors")
    uris["calib"] = f"s3://{data}/mudsc-hf-{RUN}/calib.safetensors"
    bad = {"input_ids": torch.zeros(4, 6, dtype=torch.int64), "attention_mask": torch.ones(3, 6, dtype=torch.int64)}
    save_file(bad, work / "bad.safetensors")
    s3.upload_file(str(work / "bad.safetensors"), data, f"mudsc-hf-{RUN}/bad.safetensors")
    uris["bad_calib"] = f"s3://{data}/mudsc-hf-{RUN}/bad.safetensors"
    s3.upload_file(str(work / "a" / "model.safetensors"), models, f"mudsc-hf-{RUN}/noconfig/model.safetensors")
    uris["noconfig"] = f"s3://{models}/mudsc-hf-{RUN}/noconfig/"
    return {"uris": uris, "original": original, "work": work}


def _spec(uris: dict[str, str], a: str, b: str, calib: str = "calib") -> dict[str, Any]:
    return {
        "method": {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5}},
        "models": [{"uri": uris[a]}, {"uri": uris[b]}],
        "architecture": {"name": "transformers"},
        "calibration": {"uri": uris[calib], "batch_size": 16},
        "output": {"dtype": "bfloat16"},
        "labels": {"run": RUN},
    }


def test_a_llama_folder_and_its_permuted_copy_merge_back_and_the_result_loads(
    uploaded: dict[str, Any], stack_client: Any
) -> None:
    job = stack_client.submit(_spec(uploaded["uris"], "a", "b"))
    finished = stack_client.wait(job["id"], timeout=300)
    assert finished["status"] == "succeeded", finished.get("error")
    metrics = finished["result"]["metrics"]
    assert metrics["self_check_max_rel_error"] < 1e-4 and metrics["similarity_space"] == "dual"
    out = uploaded["work"] / "result"
    stack_client.download(job["id"], out)
    merged, original = load_file(out / "model.safetensors"), load_file(uploaded["work"] / "a" / "model.safetensors")
    assert set(merged) == set(original) and "lm_head.weight" not in merged  # the tied head stays tied
    for name, tensor in original.items():
        assert merged[name].dtype == torch.bfloat16
        torch.testing.assert_close(merged[name].float(), tensor.float(), atol=1e-2, rtol=1e-2, msg=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    inputs = tokenizer("the model is", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = uploaded["original"].to(torch.bfloat16).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == 3 + 4 and torch.equal(generated, expected)


def test_folders_whose_configs_disagree_fail_naming_the_key(uploaded: dict[str, Any], stack_client: Any) -> None:
    with pytest.raises(ApiError) as refused:
        stack_client.submit(_spec(uploaded["uris"], "a", "other"))
    assert refused.value.status == 422 and refused.value.problem["code"] == "incompatible_models"
    assert "rms_norm_eps" in refused.value.problem["detail"]


def test_a_folder_without_config_and_calibration_of_unequal_lengths_are_refused(
    uploaded: dict[str, Any], stack_client: Any
) -> None:
    with pytest.raises(ApiError) as refused:
        stack_client.submit(_spec(uploaded["uris"], "a", "noconfig"))
    assert refused.value.status == 422 and refused.value.problem["code"] == "architecture_mismatch"
    assert "config.json" in refused.value.problem["detail"]
    with pytest.raises(ApiError) as refused:
        stack_client.submit(_spec(uploaded["uris"], "a", "b", calib="bad_calib"))
    assert refused.value.status == 422 and refused.value.problem["code"] == "invalid_calibration"
    assert "sample counts" in refused.value.problem["detail"]
