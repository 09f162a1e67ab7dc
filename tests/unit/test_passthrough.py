"""passthrough with slices: layer ranges of two tiny Llamas (or of one, stacked on itself) into a deeper model.

Known answer (output layer k = the slice's source layer, renamed; embeddings from the first slice's model,
final norm and lm_head from the last's; config depth = the layers stacked), the result loads and runs with
transformers, parity with mergekit on the same YAML (exact), and the refusals of what does not fit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pydantic import ValidationError

from tests.tiny_llama import tiny_llama

transformers = pytest.importorskip("transformers")
mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mudsc_core.errors import InvalidParameters  # noqa: E402
from mudsc_core.files import LocalInputs, merge_files  # noqa: E402
from mudsc_core.schema import JobSpec  # noqa: E402
from mudsc_core.schema.mergekit import MergekitConfigError, from_mergekit, from_mergekit_yaml, to_mergekit  # noqa: E402

A, B = "s3://models/acme/a/", "s3://models/acme/b/"
YAML = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [0, 2]
  - sources:
      - model: {B}
        layer_range: [1, 2]
dtype: float32
"""


def _llama(seed: int) -> Any:
    return tiny_llama(seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("passthrough")
    paths = {}
    for uri, seed in ((A, 1), (B, 2)):
        paths[uri] = root / uri.rstrip("/").rpartition("/")[2]
        _llama(seed).save_pretrained(paths[uri])
    return paths


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _ours(spec: JobSpec, folders: dict[str, Path], out: Path) -> Path:
    merge_files(spec, LocalInputs(models=[folders[m.uri] for m in spec.models]), out, device="cpu")
    return out


def test_known_answer_layers_embeddings_config_and_it_runs(folders: dict[str, Path], tmp_path: Path) -> None:
    spec = from_mergekit_yaml(YAML)
    assert [m.uri for m in spec.models] == [A, B] and spec.slices is not None
    out = _ours(spec, folders, tmp_path / "out")
    merged, a, b = _tensors(out), _tensors(folders[A]), _tensors(folders[B])
    expected = {}
    for k, (src, layer) in enumerate(((a, 0), (a, 1), (b, 1))):
        for name, tensor in src.items():
            if f"model.layers.{layer}." in name:
                expected[name.replace(f"model.layers.{layer}.", f"model.layers.{k}.")] = tensor
    expected["model.embed_tokens.weight"] = a["model.embed_tokens.weight"]  # the first slice's model
    expected["model.norm.weight"] = b["model.norm.weight"]  # the last slice's model
    expected["lm_head.weight"] = b["lm_head.weight"]
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    card = (out / "README.md").read_text()
    assert "merge_method: passthrough" in card and "layer_range" in card
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 16) and bool(torch.isfinite(logits).all())


def test_parity_with_mergekit(folders: dict[str, Path], tmp_path: Path) -> None:
    spec = from_mergekit_yaml(YAML)
    ours = _ours(spec, folders, tmp_path / "ours")
    theirs_config = mergekit_config.MergeConfiguration.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": str(folders[A]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(folders[B]), "layer_range": [1, 2]}]},
            ],
            "dtype": "float32",
        }
    )
    theirs = tmp_path / "theirs"
    mergekit_merge.run_merge(
        theirs_config,
        str(theirs),
        options=MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False),
    )
    mine, other = _tensors(ours), _tensors(theirs)
    assert set(mine) == set(other), set(mine) ^ set(other)
    gap = max(float((mine[k].float() - other[k].float()).abs().max()) for k in mine)
    print(f"parity passthrough: max |ours - mergekit| = {gap:.3g}")
    assert gap == 0.0
    depth = [json.loads((f / "config.json").read_text())["num_hidden_layers"] for f in (ours, theirs)]
    assert depth == [3, 3]


SELF_STACK = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {A}
        layer_range: [0, 2]
  - sources:
      - model: {A}
        layer_range: [1, 2]
  - sources:
      - model: {A}
        layer_range: [0, 1]
dtype: float32
"""


def test_one_model_stacked_on_itself_equals_mergekit(folders: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's self-stacking frankenmerge: one model, layers 0-1 then 1 then 0 (depth 4)."""
    spec = from_mergekit_yaml(SELF_STACK)
    assert [m.uri for m in spec.models] == [A]
    ours = _ours(spec, folders, tmp_path / "ours")
    theirs = tmp_path / "theirs"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(SELF_STACK.replace(A, str(folders[A])))),
        str(theirs),
        options=MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False),
    )
    mine, other, a = _tensors(ours), _tensors(theirs), _tensors(folders[A])
    assert set(mine) == set(other), set(mine) ^ set(other)
    gap = max(float((mine[k].float() - other[k].float()).abs().max()) for k in mine)
    print(f"parity passthrough, one model: {len(mine)} tensors, max |ours - mergekit| = {gap:.3g}")
    assert gap == 0.0
    for k, layer in enumerate((0, 1, 1, 0)):
        name = "self_attn.q_proj.weight"
        assert torch.equal(mine[f"model.layers.{k}.{name}"], a[f"model.layers.{layer}.{name}"])
    depth = [json.loads((f / "config.json").read_text())["num_hidden_layers"] for f in (ours, theirs)]
    assert depth == [4, 4]
    config = to_mergekit(spec.model_dump(mode="json")).config
    assert config is not None and from_mergekit(config) == spec


def test_the_card_s_yaml_translates_back_to_the_same_spec() -> None:
    spec = from_mergekit_yaml(YAML)
    config = to_mergekit(spec.model_dump(mode="json")).config
    assert config is not None
    assert config["slices"] == [
        {"sources": [{"model": A, "layer_range": [0, 2]}]},
        {"sources": [{"model": B, "layer_range": [1, 2]}]},
    ]
    assert from_mergekit(config) == spec


def test_a_range_beyond_the_layers_is_refused_naming_the_slice(folders: dict[str, Path], tmp_path: Path) -> None:
    spec = from_mergekit_yaml(YAML.replace("[1, 2]", "[1, 5]"))
    with pytest.raises(InvalidParameters, match=r"slices\[1\]: layer_range \[1, 5\] is beyond models\[1\]'s 2 layers"):
        _ours(spec, folders, tmp_path / "out")
    assert not any((tmp_path / "out").glob("*.safetensors"))


def _spec(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "method": {"name": "passthrough"},
        "models": [{"uri": A}, {"uri": B}],
        "slices": [
            {"sources": [{"model": 0, "layer_range": [0, 2]}]},
            {"sources": [{"model": 1, "layer_range": [1, 2]}]},
        ],
    }
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"slices": None}, "method 'passthrough' needs slices"),
        ({"slices": []}, "at least 1 item"),
        ({"method": {"name": "linear"}}, "slices (layer ranges) are taken by method 'passthrough' only"),
        ({"slices": [{"sources": [{"model": 2, "layer_range": [0, 1]}]}]}, "slices[0].sources[0].model 2"),
        ({"slices": [{"sources": [{"model": 0, "layer_range": [0, 2]}]}]}, "models[1] is used by no slice"),
        ({"slices": [{"sources": [{"model": 0, "layer_range": [2, 2]}]}]}, "is empty"),
        ({"slices": [{"sources": [{"model": 0, "layer_range": [0, 1, 2]}]}]}, "[start, end]"),
        (
            {"slices": [{"sources": [{"model": 0, "layer_range": [0, 1]}, {"model": 1, "layer_range": [0, 1]}]}]},
            "exactly one source",
        ),
        ({"base_model": {"uri": A}}, "does not use a base_model"),
        ({"models": [{"uri": A, "weight": 2.0}, {"uri": B}]}, "takes no model weights"),
    ],
)
def test_bad_specs_are_refused(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(_spec(**changes))
    assert fragment in str(caught.value), str(caught.value)


def test_one_model_is_for_passthrough_only() -> None:
    one = _spec(models=[{"uri": A}], slices=[{"sources": [{"model": 0, "layer_range": [0, 2]}]}] * 2)
    assert len(JobSpec.model_validate(one).models) == 1
    for method, extra in (("ties", {"base_model": {"uri": B}}), ("linear", {}), ("slerp", {})):
        body = {"method": {"name": method}, "models": [{"uri": A}], **extra}
        with pytest.raises(ValidationError) as caught:
            JobSpec.model_validate(body)
        errors = caught.value.errors()
        assert errors[0]["loc"] == ("models",), errors
        assert f"method {method!r} needs at least 2 models, got 1" in errors[0]["msg"]
        assert "only 'passthrough' takes a single model" in errors[0]["msg"]
    with pytest.raises(ValidationError, match="at least 1 item"):
        JobSpec.model_validate(_spec(models=[]))
    errors = _yaml_errors({"merge_method": "ties", "base_model": B, "models": [{"model": A}]})
    assert any(e["loc"] == ["models"] and "needs at least 2 models" in e["msg"] for e in errors), errors


def test_passthrough_without_slices_and_slices_without_passthrough_are_refused() -> None:
    assert JobSpec.model_validate(_spec()).slices is not None
    with pytest.raises(ValidationError, match="needs slices"):
        JobSpec.model_validate(_spec(slices=None))
    with pytest.raises(ValidationError, match="'passthrough' only"):
        JobSpec.model_validate(_spec(method={"name": "ties"}, base_model={"uri": A}))


def _yaml_errors(config: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(MergekitConfigError) as caught:
        from_mergekit(config)
    return caught.value.errors


@pytest.mark.parametrize(
    ("config", "loc", "fragment"),
    [
        ({"merge_method": "ties", "base_model": A, "models": [{"model": B}], "slices": []}, ["slices"], "passthrough"),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": A, "layer_range": [0, 1]}, {"model": B, "layer_range": [0, 1]}]}]},
            ["slices", 0, "sources"],
            "exactly one source",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": A, "layer_range": [0, 1], "parameters": {"scale": 0.5}}]}, {"sources": [{"model": B, "layer_range": [0, 1]}]}]},
            ["slices", 0, "sources", 0, "parameters"],
            "scale",
        ),
        (
            {"merge_method": "passthrough", "parameters": {"scale": 0.5}, "slices": [{"sources": [{"model": A, "layer_range": [0, 1]}]}, {"sources": [{"model": B, "layer_range": [0, 1]}]}]},
            ["parameters", "scale"],
            "no parameter",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": A, "layer_range": [3, 1]}]}, {"sources": [{"model": B, "layer_range": [0, 1]}]}]},
            ["slices", 0, "sources", 0, "layer_range"],
            "empty",
        ),
        ({"merge_method": "passthrough", "models": [{"model": A}, {"model": B}]}, ["models"], "slices"),
    ],
)  # fmt: skip
def test_yaml_refusals_are_at_their_key(config: dict[str, Any], loc: list[Any], fragment: str) -> None:
    errors = _yaml_errors(config)
    matching = [e for e in errors if e["loc"][: len(loc)] == loc]
    assert matching, errors
    assert fragment in matching[0]["msg"], matching
