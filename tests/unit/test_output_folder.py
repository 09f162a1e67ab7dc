"""The output folder's sidecars (mudsc_core.output) and the mergekit equivalent on the model card."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mudsc_core.output import carried_files, write_sidecars
from mudsc_core.schema import JobSpec
from mudsc_core.schema.mergekit import to_mergekit


def test_config_dtype_follows_the_output_and_other_configs_are_copied_verbatim(tmp_path: Path) -> None:
    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32", "dtype": "float32"}))
    (tmp_path / "a").mkdir()
    write_sidecars(tmp_path / "a", config_source=hf, dtype="bfloat16")
    written = json.loads((tmp_path / "a" / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "bfloat16" and written["model_type"] == "llama"
    toy = tmp_path / "toy.json"
    toy.write_text('{"model_type": "toy"}')
    (tmp_path / "b").mkdir()
    write_sidecars(tmp_path / "b", config_source=toy, dtype="bfloat16")
    assert (tmp_path / "b" / "config.json").read_text() == '{"model_type": "toy"}'


def test_carried_files_are_the_tokenizer_and_generation_config_only(tmp_path: Path) -> None:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "modeling_x.py",
        "README.md",
    ):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in carried_files(tmp_path)] == [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert carried_files(tmp_path / "model.safetensors") == [] and carried_files(None) == []


def _spec(method: str, params: dict, base: bool = True, **output: object) -> dict:
    body = {
        "method": {"name": method, "params": params},
        "models": [{"uri": "s3://models/a/"}, {"uri": "s3://models/b/", "weight": 0.5}],
        "output": output,
    }
    if base:
        body["base_model"] = {"uri": "s3://models/base/"}
    return JobSpec.model_validate(body).model_dump(mode="json")


def test_mergekit_equivalent_of_ties_names_per_model_and_global_parameters() -> None:
    config = yaml.safe_load(
        to_mergekit(_spec("ties", {"density": 0.3, "scaling_factor": 0.7}, dtype="bfloat16")).yaml or ""
    )
    assert config["merge_method"] == "ties" and config["base_model"] == "s3://models/base/"
    assert config["models"][1] == {"model": "s3://models/b/", "parameters": {"weight": 0.5, "density": 0.3}}
    assert config["parameters"] == {"lambda": 0.7, "normalize": True} and config["dtype"] == "bfloat16"


def test_mergekit_equivalent_is_refused_with_a_reason_where_mergekit_differs() -> None:
    assert "sign election" in to_mergekit(_spec("ties", {"consensus": "count"})).reason
    assert "topk_scope" in to_mergekit(_spec("ties", {"topk_scope": "model"})).reason
    assert to_mergekit(_spec("tsv_merge", {})).config is None
    dare = to_mergekit(_spec("dare_ties", {"density": 0.4}))
    assert dare.config is not None and dare.config["parameters"]["rescale"] is True and "no seed" in dare.reason
    slerp = yaml.safe_load(to_mergekit(_spec("slerp", {"t": 0.25}, base=False)).yaml or "")
    assert slerp["base_model"] == "s3://models/a/" and slerp["parameters"] == {"t": 0.25}
