"""Permutation merges of Hugging Face transformers models: ``"architecture": {"name": "transformers"}``.

The model is built from the folders' config.json (never downloaded); calibration tensors are the forward's
keywords. For BERT, GPT-2, Llama (GQA, rotary, tied embeddings) and ViT: a model merged with a permuted
copy of itself comes back exactly with the weight-space methods, through the worker's file-level entry
point, and the output folder loads with ``from_pretrained`` (tied embeddings stay tied). Bad inputs fail
with their codes: configs that disagree, calibration tensors that do not fit the forward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mudsc_core.architectures import trace_architecture
from mudsc_core.architectures import transformers as hf
from mudsc_core.errors import IncompatibleModels, InvalidCalibration, InvalidParameters, MergeError
from mudsc_core.files import LocalInputs, merge_files
from mudsc_core.formats.hf_config import agree
from mudsc_core.permutation.merge import merge
from mudsc_core.permutation.permute import permute_state_dict, random_permutations
from mudsc_core.schema import ArchitectureSpec, JobSpec

transformers = pytest.importorskip("transformers")

VOCAB, TOKENS, SAMPLES = 40, 10, 24


def _bert() -> Any:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
        architectures=["BertForSequenceClassification"],
    )


def _gpt2() -> Any:
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, architectures=["GPT2LMHeadModel"]
    )


def _llama() -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )


def _vit() -> Any:
    return transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
        architectures=["ViTForImageClassification"],
    )


FAMILIES: dict[str, Callable[[], Any]] = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "vit": _vit}


def _model(config: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(transformers, config.architectures[0])(config).eval()  # type: ignore[no-any-return]


def _calibration(config: Any, samples: int = SAMPLES, seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if config.model_type == "vit":
        return {"pixel_values": torch.randn(samples, 3, config.image_size, config.image_size, generator=generator)}
    mask = torch.ones(samples, TOKENS, dtype=torch.long)
    mask[::2, 6:] = 0  # every other sample padded after 6 tokens
    return {"input_ids": torch.randint(0, VOCAB, (samples, TOKENS), generator=generator), "attention_mask": mask}


def _arch(config: Any) -> dict[str, Any]:
    return {"name": "transformers", "config": config.to_dict()}


def _outputs(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**inputs).logits  # type: ignore[no-any-return]


def _spec(method: str, folders: list[Path], calibration: bool = True, **params: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "method": {"name": method, "params": params},
            "models": [{"uri": f"s3://models/m{i}/"} for i in range(len(folders))],
            "architecture": {"name": "transformers"},
            "calibration": {"uri": "s3://data/calib.safetensors"} if calibration else None,
        }
    )


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model folder, a permuted copy's folder, and a calibration file, per family."""
    config = FAMILIES[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    model = _model(config, 0)
    spec = trace_architecture(_arch(config)).spec
    moved = permute_state_dict(
        spec,
        {k: v.clone() for k, v in model.state_dict().items()},
        random_permutations(spec, torch.Generator().manual_seed(7)),
    )
    permuted = _model(config, 1)
    permuted.load_state_dict(moved)
    model.save_pretrained(root / "a")
    permuted.save_pretrained(root / "b")
    calibration = _calibration(config)
    save_file(calibration, root / "calib.safetensors")
    return {"name": request.param, "config": config, "model": model, "root": root, "calibration": calibration}


@pytest.mark.parametrize("method", ["git_rebasin", "weight_zip", "mudsc"])
def test_a_permuted_copy_merges_back_into_the_model_and_the_folder_loads(family: dict[str, Any], method: str) -> None:
    root, model = family["root"], family["model"]
    out = root / f"out-{method}"
    folders = [root / "a", root / "b"]
    params = {"mode": "zip"} if method == "mudsc" else {}
    report = merge_files(
        _spec(method, folders, **params),
        LocalInputs(models=folders, calibration=root / "calib.safetensors"),
        out,
        device="cpu",
    )
    assert report["spec"]["capture"] == "export" and report["spec"]["self_check"]["max_rel_error"] < 1e-4
    merged = load_file(out / "model.safetensors")
    original = load_file(root / "a" / "model.safetensors")
    assert set(merged) == set(original)  # a tied head stays left out, as save_pretrained left it
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
    loaded = getattr(transformers, family["config"].architectures[0]).from_pretrained(out).eval()
    head, embeddings = loaded.get_output_embeddings(), loaded.get_input_embeddings()
    if getattr(family["config"], "tie_word_embeddings", False) and head is not None:
        assert head.weight is embeddings.weight
    inputs = {k: v[:4] for k, v in family["calibration"].items()}
    torch.testing.assert_close(_outputs(loaded, inputs), _outputs(model, inputs), atol=1e-4, rtol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == family["config"].architectures and config["dtype"] == "float32"


def test_padding_does_not_count_as_samples(tmp_path: Path) -> None:
    """Tokens behind attention_mask == 0 leave the activation statistics, so the merge, unchanged."""
    config = _bert()
    states = [_model(config, seed).state_dict() for seed in (0, 1)]
    calibration = _calibration(config)
    garbage = dict(calibration)
    ids = calibration["input_ids"].clone()
    ids[calibration["attention_mask"] == 0] = (ids[calibration["attention_mask"] == 0] + 7) % VOCAB
    garbage["input_ids"] = ids
    method = {"name": "mudsc", "params": {"mode": "zip", "beta": 0.0}}
    first = merge(states, _arch(config), method, calibration).state_dict
    second = merge(states, _arch(config), method, garbage).state_dict
    for name in first:
        torch.testing.assert_close(second[name], first[name], msg=name)
    unmasked = merge(states, _arch(config), method, {"input_ids": ids}).state_dict
    assert any(not torch.allclose(unmasked[n], first[n]) for n in first)  # the padding would have counted


# --------------------------------------------------------------------------- bad inputs
def test_configs_that_disagree_fail_naming_the_key(tmp_path: Path) -> None:
    a, b = _bert(), _bert()
    b.layer_norm_eps = 1e-5
    _model(a, 0).save_pretrained(tmp_path / "a")
    _model(b, 1).save_pretrained(tmp_path / "b")
    folders = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(IncompatibleModels, match="layer_norm_eps"):
        merge_files(
            _spec("git_rebasin", folders, calibration=False), LocalInputs(models=folders), tmp_path / "o", device="cpu"
        )


def test_bookkeeping_keys_and_label_names_do_not_count() -> None:
    config = _bert().to_dict()
    other = {
        **config,
        "_name_or_path": "elsewhere",
        "transformers_version": "4.0",
        "id2label": {0: "x", 1: "y", 2: "z"},
    }
    agree([config, other], ["a", "b"])
    with pytest.raises(IncompatibleModels, match="labels"):
        agree([config, {**config, "id2label": {0: "x"}}], ["a", "b"])


def test_a_config_of_another_class_or_an_unknown_class_is_refused() -> None:
    config = _bert().to_dict()
    with pytest.raises(MergeError, match="no such model class"):
        trace_architecture({"name": "transformers", "config": {**config, "architectures": ["NoSuchModel"]}})
    with pytest.raises(MergeError, match="model_type"):
        trace_architecture({"name": "transformers", "config": {**config, "architectures": ["GPT2Model"]}})
    with pytest.raises(ValueError, match="model_type"):
        ArchitectureSpec(name="transformers", config={"hidden_size": 32})


def test_separate_heads_are_refused_for_transformers_models() -> None:
    config = _bert()
    states = [_model(config, seed).state_dict() for seed in (0, 1)]
    with pytest.raises(InvalidParameters, match="separate"):
        merge(states, _arch(config), {"name": "git_rebasin", "params": {"heads": "separate"}})


_BAD_CALIBRATION = st.one_of(
    st.tuples(st.just("id above the vocabulary"), st.integers(VOCAB, 10**6)),
    st.tuples(st.just("negative id"), st.integers(-(10**6), -1)),
    st.tuples(st.just("sample counts differ"), st.integers(1, 7)),  # of the 8 samples
    st.tuples(st.just("no input_ids"), st.just(0)),
    st.tuples(st.just("unknown keyword"), st.just(0)),
    st.tuples(st.just("mask not 0/1"), st.integers(2, 100)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_BAD_CALIBRATION)
def test_calibration_that_does_not_fit_the_forward_is_invalid_calibration(case: tuple[str, int]) -> None:
    kind, value = case
    config = _bert()
    inputs = _calibration(config, samples=8)
    if kind in ("id above the vocabulary", "negative id"):
        inputs["input_ids"][3, 2] = value
    elif kind == "sample counts differ":
        inputs["attention_mask"] = inputs["attention_mask"][:value]
    elif kind == "no input_ids":
        del inputs["input_ids"]
    elif kind == "unknown keyword":
        inputs["pixel_values"] = torch.zeros(8, 3, 4, 4)
    else:
        inputs["attention_mask"][0, 0] = value
    with pytest.raises(InvalidCalibration):
        hf.check_inputs(ArchitectureSpec(name="transformers", config=config.to_dict()).typed_config(), inputs, _BERT)


_BERT = _model(_bert(), 0)


def test_a_features_encoder_merged_by_align_keeps_its_stream_free_in_model_0s_order() -> None:
    """``BertModel`` returns features: align leaves its residual stream and pooler free (the outputs come
    back in model 0's order, a drop-in for model 0); zip, whose merged order is no model's, pins them."""
    config = _bert()
    config.architectures = ["BertModel"]
    arch = _arch(config)
    model = _model(config, 0)
    free = trace_architecture(arch, free_outputs=True).spec
    pinned = trace_architecture(arch).spec
    assert len(free.groups) == len(pinned.groups) + 2  # + the residual stream and the pooler
    moved = permute_state_dict(free, model.state_dict(), random_permutations(free, torch.Generator().manual_seed(4)))
    assert not torch.equal(
        moved["embeddings.word_embeddings.weight"], model.state_dict()["embeddings.word_embeddings.weight"]
    )
    calibration = _calibration(config, samples=8)
    for method in ({"name": "git_rebasin"}, {"name": "mudsc", "params": {"mode": "align"}}):
        result = merge([model.state_dict(), moved], arch, method, calibration)
        assert "model 0's unit order" in result.report["spec"]["outputs"]
        merged = _model(config, 3)
        merged.load_state_dict(result.state_dict)
        with torch.no_grad():
            expected, got = model(**calibration), merged(**calibration)
        torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-4)
    zipped = merge([model.state_dict(), moved], arch, {"name": "mudsc", "params": {"mode": "zip"}}, calibration)
    assert "pinned" in zipped.report["spec"]["outputs"]


def test_gpt2_conv1d_layers_are_activation_sites() -> None:
    """GPT-2's Conv1D is ``addmm(bias, x, weight)``: its groups are observed at those modules, so the
    activation-only methods merge GPT-2 too (a permuted copy comes back exactly)."""
    config = _gpt2()
    spec = trace_architecture(_arch(config)).spec
    assert all(g.activation is not None for g in spec.groups.values())
    qk = spec.groups["transformer.h.0.attn.c_attn"].activation
    assert qk is not None and qk.module == "transformer.h.0.attn.c_attn" and qk.segments == ((0, 32), (32, 64))
    model = _model(config, 0)
    moved = permute_state_dict(spec, model.state_dict(), random_permutations(spec, torch.Generator().manual_seed(2)))
    merged = merge([model.state_dict(), moved], _arch(config), {"name": "activation_align"}, _calibration(config))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(merged.state_dict[name], tensor, atol=2e-6, rtol=1e-5, msg=name)
