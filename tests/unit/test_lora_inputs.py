"""LoRA adapters as inputs: a model is a base folder with a PEFT adapter applied as its tensors are read.

A tiny Llama (built from a config: nothing is downloaded) is the base; two LoRA fine-tunes of it are made
with ``peft`` on q_proj/v_proj (B drawn at random, so the adapters are not zero; one uses rsLoRA) and saved
with ``save_pretrained``. Merging the adapters must equal merging the full models PEFT materialises
(``merge_and_unload``); every unsupported or mismatched adapter fails ``invalid_checkpoint`` naming the tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from mudsc_core.errors import InvalidCheckpoint
from mudsc_core.files import LocalInputs, merge_files
from mudsc_core.formats import peft_adapter
from mudsc_core.lora import open_lora_checkpoint
from mudsc_core.schema import JobSpec

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BASE_URI = "s3://models/lora/base/"
ADAPTER_URIS = ["s3://models/lora/a1/", "s3://models/lora/a2/"]


def llama(seed: int, hidden: int = 32) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=13,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def make_adapter(base_folder: Path, out: Path, seed: int, **lora: Any) -> Path:
    """A LoRA fine-tune of the base saved as an adapter folder at ``out``; its merged model at ``out``.merged."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_folder)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    tuned = peft.get_peft_model(model, peft.LoraConfig(**settings))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, 0.2)
    tuned.save_pretrained(out)
    merged = tuned.merge_and_unload()
    merged.save_pretrained(out.with_name(out.name + ".merged"))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("lora")
    llama(0).save_pretrained(work / "base")
    llama(7, hidden=48).save_pretrained(work / "other_base")
    make_adapter(work / "base", work / "a1", 1)
    make_adapter(work / "base", work / "a2", 2, r=2, lora_alpha=5, use_rslora=True)
    make_adapter(work / "other_base", work / "foreign", 3)
    return {p.name: p for p in work.iterdir()}


def spec(method: str, params: dict[str, Any], lora: bool) -> JobSpec:
    models: list[dict[str, Any]] = (
        [{"uri": BASE_URI, "lora": {"uri": u}} for u in ADAPTER_URIS]
        if lora
        else [{"uri": "s3://models/lora/m1/"}, {"uri": "s3://models/lora/m2/", "weight": 0.5}]
    )
    if lora:
        models[1]["weight"] = 0.5
    return JobSpec.model_validate(
        {"method": {"name": method, "params": params}, "models": models, "base_model": {"uri": BASE_URI}}
    )


def result(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    ("method", "params"),
    [("task_arithmetic", {"scaling_factor": 1.0}), ("ties", {"density": 0.5, "scaling_factor": 1.0})],
)
def test_merging_adapters_equals_merging_their_materialised_models(
    folders: dict[str, Path], tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    base = folders["base"]
    lora_inputs = LocalInputs(models=[base, base], base_model=base, loras=[folders["a1"], folders["a2"]])
    full_inputs = LocalInputs(models=[folders["a1.merged"], folders["a2.merged"]], base_model=base)
    merge_files(spec(method, params, lora=True), lora_inputs, tmp_path / "lora", device="cpu")
    merge_files(spec(method, params, lora=False), full_inputs, tmp_path / "full", device="cpu")
    got, want = result(tmp_path / "lora"), result(tmp_path / "full")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)
    base_q = load_file(base / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], base_q)  # the adapters did something


def test_the_view_applies_the_adapter_tensor_by_tensor(folders: dict[str, Path]) -> None:
    view = open_lora_checkpoint(folders["base"], folders["a2"])
    merged = load_file(folders["a2.merged"] / "model.safetensors")
    assert sorted(view.pairs) == sorted(n for n in merged if "q_proj" in n or "v_proj" in n)
    assert view.scale == pytest.approx(5 / 2**0.5)  # rsLoRA: alpha / sqrt(r)
    for name in view.keys():
        torch.testing.assert_close(view.get_float32(name), merged[name].float(), atol=1e-5, rtol=0)
        assert view.get(name).dtype == view.dtype(name)


# ---------------------------------------------------------------------------- bad adapters
def edited(source: Path, dest: Path, config: dict[str, Any] | None = None, tensors: Any = None) -> Path:
    shutil.copytree(source, dest)
    if config is not None:
        path = dest / peft_adapter.CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        path = dest / peft_adapter.WEIGHTS_NAME
        save_file(tensors(load_file(path)), path)
    return dest


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
V0 = "base_model.model.model.layers.0.self_attn.v_proj"


def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.z_proj"): v for k, v in state.items()}


def _without_b(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k != f"{V0}.lora_B.weight"}


def _with_embedding(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**state, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 13)}


def _with_magnitude(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**state, f"{Q0}.lora_magnitude_vector": torch.ones(32)}


def _wrong_rank(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**state, f"{Q0}.lora_B.weight": torch.zeros(32, 3)}


BAD = {
    "another base": (None, None, rf"{Q0}\.lora_A\.weight' has shape \[4, 48\], expected \[4, 32\]"),
    "target absent from the base": (
        {"target_modules": ["q_proj", "v_proj", "z_proj"]},
        _renamed,
        r"z_proj\.lora_A\.weight' adapts model\.layers\.0\.self_attn\.z_proj\.weight, which the base does not have",
    ),
    "listed target absent": ({"target_modules": ["q_proj", "v_proj", "w_proj"]}, None, "'w_proj' is absent"),
    "module not targeted": ({"target_modules": ["q_proj"]}, None, rf"{V0}\.lora_A\.weight' adapts module"),
    "missing half": (None, _without_b, rf"{V0}\.lora_A\.weight' has no lora_B half"),
    "rank": ({"r": 8}, None, rf"{Q0}\.lora_A\.weight' has shape \[4, 32\], expected \[8, 32\]"),
    "B rank": (None, _wrong_rank, rf"{Q0}\.lora_B\.weight' has shape \[32, 3\], expected \[32, 4\]"),
    "fan_in_fan_out": ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    "dora": ({"use_dora": True}, None, "DoRA"),
    "dora magnitude": (None, _with_magnitude, rf"{Q0}\.lora_magnitude_vector' is a DoRA magnitude"),
    "bias": ({"bias": "all"}, None, "bias 'all'"),
    "embedding": (None, _with_embedding, r"embed_tokens\.lora_embedding_A' is an embedding adapter"),
    "not lora": ({"peft_type": "IA3"}, None, "peft_type 'IA3'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_adapter_fails_invalid_checkpoint_naming_the_tensor(
    folders: dict[str, Path], tmp_path: Path, case: str
) -> None:
    config, tensors, message = BAD[case]
    source = folders["foreign" if case == "another base" else "a1"]
    adapter = edited(source, tmp_path / "bad", config, tensors)
    inputs = LocalInputs(
        models=[folders["base"], folders["base"]], base_model=folders["base"], loras=[adapter, folders["a2"]]
    )
    with pytest.raises(InvalidCheckpoint, match=message) as caught:
        merge_files(spec("task_arithmetic", {}, lora=True), inputs, tmp_path / "out", device="cpu")
    assert caught.value.code == "invalid_checkpoint"
    assert caught.value.message.startswith(ADAPTER_URIS[0])  # named as the user gave it
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_adapter_folder_without_its_weights_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    adapter = edited(folders["a1"], tmp_path / "bad")
    (adapter / peft_adapter.WEIGHTS_NAME).unlink()
    with pytest.raises(InvalidCheckpoint, match="adapter_model.safetensors not found"):
        open_lora_checkpoint(folders["base"], adapter)


def test_an_oversized_or_deep_adapter_config_is_refused() -> None:
    with pytest.raises(InvalidCheckpoint, match="nested"):
        peft_adapter.parse_config(b"[" * 100 + b"]" * 100)
    with pytest.raises(InvalidCheckpoint, match="more than"):
        peft_adapter.files_to_fetch({peft_adapter.CONFIG_NAME: 10**8, peft_adapter.WEIGHTS_NAME: 10})


def test_the_spec_takes_adapters_for_same_base_methods_only() -> None:
    assert spec("task_arithmetic", {}, lora=True).models[0].lora is not None
    with pytest.raises(ValidationError, match="takes no LoRA adapters"):
        JobSpec.model_validate(
            {
                "method": {"name": "mudsc", "params": {"mode": "zip"}},
                "models": [
                    {"uri": "s3://models/a.safetensors", "lora": {"uri": "s3://models/ad/"}},
                    {"uri": "s3://models/b.safetensors"},
                ],
                "architecture": {"name": "mlp", "config": {"input_dim": 8, "hidden": [4], "num_classes": 3}},
            }
        )
    with pytest.raises(ValidationError, match="adapter folder ending in '/'"):
        JobSpec.model_validate(
            {
                "method": {"name": "task_arithmetic"},
                "models": [{"uri": BASE_URI, "lora": {"uri": "s3://models/ad.safetensors"}}, {"uri": BASE_URI}],
                "base_model": {"uri": BASE_URI},
            }
        )
