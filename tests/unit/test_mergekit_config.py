"""mergekit YAML -> our job spec (mudsc_core.schema.mergekit): translation, refusals naming the key, round trip."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mudsc_core.schema import JobSpec
from mudsc_core.schema.mergekit import (
    MergekitConfigError,
    from_mergekit,
    from_mergekit_yaml,
    is_yaml_media_type,
    parse_mergekit_yaml,
    to_mergekit,
)

BASE, A, B, C = (f"s3://models/acme/{n}/" for n in ("base", "a", "b", "c"))


def _errors(config: Any) -> list[dict[str, Any]]:
    with pytest.raises(MergekitConfigError) as info:
        from_mergekit_yaml(config) if isinstance(config, str) else from_mergekit(config)
    return info.value.errors


def _locs(config: Any) -> list[list[Any]]:
    return [e["loc"] for e in _errors(config)]


def test_a_ties_configuration_translates_key_by_key() -> None:
    spec = from_mergekit_yaml(
        f"""
merge_method: ties
base_model: {BASE}
models:
  - model: {A}
    parameters: {{weight: 1.0, density: [0.2, 0.8]}}
  - model: {B}
    parameters:
      weight: 0.5
      density: [{{filter: self_attn, value: 0.3}}, {{value: 0.6}}]
parameters: {{lambda: 0.7, normalize: false, int8_mask: true}}
dtype: bfloat16
tokenizer_source: {B}
name: my-merge
"""
    ).model_dump(mode="json")
    assert spec["method"]["name"] == "ties"
    params = spec["method"]["params"]
    assert params["scaling_factor"] == 0.7 and params["normalize"] is False
    assert params["density"] == 1.0  # mergekit's default, not ours (0.2)
    assert spec["base_model"]["uri"] == BASE
    assert spec["models"][0]["parameters"] == {"weight": 1.0, "density": [0.2, 0.8]}
    assert spec["models"][1]["parameters"]["density"] == [
        {"filter": "self_attn", "value": 0.3},
        {"filter": None, "value": 0.6},
    ]
    assert spec["output"]["dtype"] == "bfloat16" and spec["output"]["tokenizer_source"] == 1


def test_slerp_base_is_our_first_model_and_out_dtype_wins() -> None:
    spec = from_mergekit(
        {
            "merge_method": "slerp",
            "base_model": A,
            "models": [{"model": A}, {"model": B}],
            "parameters": {"t": [0, 0.5, 1]},
            "dtype": "float32",
            "out_dtype": "bf16",
        }
    ).model_dump(mode="json")
    assert [m["uri"] for m in spec["models"]] == [A, B] and spec["base_model"] is None
    assert spec["method"]["params"]["t"] == [0, 0.5, 1] and spec["output"]["dtype"] == "bfloat16"
    assert to_mergekit(from_mergekit({"merge_method": "slerp", "base_model": A, "models": [{"model": B}],
                                      "parameters": {"t": 0.3}}).model_dump(mode="json")).config["models"] == [
        {"model": A},
        {"model": B},
    ]  # fmt: skip


def test_the_base_listed_among_the_models_stays_the_base() -> None:
    spec = from_mergekit(
        {"merge_method": "task_arithmetic", "base_model": BASE, "models": [{"model": BASE}, {"model": A}, {"model": B}]}
    )
    assert [m.uri for m in spec.models] == [A, B] and spec.base_model is not None


def test_a_global_weight_is_every_model_s_fallback() -> None:
    spec = from_mergekit(
        {
            "merge_method": "linear",
            "models": [{"model": A}, {"model": B, "parameters": {"weight": 2}}],
            "parameters": {"weight": 0.5},
        }
    )
    assert [m.parameters["weight"] for m in spec.models] == [0.5, 2]


@pytest.mark.parametrize(
    ("config", "loc", "fragment"),
    [
        ({"slices": []}, ["slices"], "slices"),
        ({"modules": {}}, ["modules"], "modules"),
        ({"tokenizer": {"source": "union"}}, ["tokenizer"], "vocabulary"),
        ({"chat_template": "chatml"}, ["chat_template"], "chat_template"),
        ({"frobnicate": 1}, ["frobnicate"], "supported keys"),
        ({"tokenizer_source": "union"}, ["tokenizer_source"], "union"),
        ({"tokenizer_source": "s3://models/acme/z/"}, ["tokenizer_source"], "one of the models"),
        ({"merge_method": "passthrough"}, ["models"], "slices"),
        ({"merge_method": "passthrough", "base_model": None, "models": None}, ["slices"], "missing"),
        ({"merge_method": "mudsc"}, ["merge_method"], "supported"),
        ({"dtype": "float64"}, ["dtype"], "supported"),
        ({"parameters": {"scaling_factor": 1}}, ["parameters", "scaling_factor"], "lambda"),
        ({"parameters": {"seed": 1}}, ["parameters", "seed"], "it takes"),
        ({"parameters": {"lambda": 500}}, ["parameters", "lambda"], "outside"),
        ({"parameters": {"density": [0.5, "x"]}}, ["parameters", "density"], ""),
        ({"base_model": "mistralai/Mistral-7B-v0.1"}, ["base_model"], "s3://"),
        ({"base_model": None}, ["base_model"], "needs a base_model"),
    ],
)
def test_what_we_cannot_honour_is_refused_at_its_key(config: dict[str, Any], loc: list[Any], fragment: str) -> None:
    body = {
        "merge_method": "ties",
        "base_model": BASE,
        "models": [{"model": A, "parameters": {"weight": 1}}, {"model": B, "parameters": {"weight": 1}}],
        **config,
    }
    errors = _errors(body)
    matching = [e for e in errors if e["loc"][: len(loc)] == loc]
    assert matching, errors
    assert fragment in matching[0]["msg"]


@pytest.mark.parametrize(
    ("models", "loc"),
    [
        ([{"model": "hf-org/model-a"}, {"model": B}], ["models", 0, "model"]),
        ([{"model": A, "lora": "x"}, {"model": B}], ["models", 0, "lora"]),
        ([{"model": A, "parameters": {"gamma": 0.1}}, {"model": B}], ["models", 0, "parameters", "gamma"]),
        (
            [{"model": A, "parameters": {"scaling_factor": 0.1}}, {"model": B}],
            ["models", 0, "parameters", "scaling_factor"],
        ),
        ([{"model": A, "parameters": {"lambda": 200}}, {"model": B}], ["models", 0, "parameters"]),
        ([{"model": A}, {"model": B, "parameters": {"density": 1.5}}], ["models", 1, "parameters"]),
        ([{"model": A}, {"model": "s3://models/acme/x.bin"}], ["models", 1, "model"]),
        ([{"model": A}], ["models"]),
        ("not a list", ["models"]),
    ],
)
def test_model_entries_are_refused_at_their_key(models: Any, loc: list[Any]) -> None:
    errors = _errors({"merge_method": "ties", "base_model": BASE, "models": models})
    assert any(e["loc"][: len(loc)] == loc for e in errors), errors


def test_dare_and_della_get_mergekit_s_rescaling_and_a_per_model_lambda() -> None:
    """A mergekit YAML gives mergekit's numbers: survivors rescaled to each tensor's L1 norm (rescale_rule
    'l1_norm'); a JSON job keeps the papers' 1/keep-probability unless it asks otherwise."""
    for method in ("dare_linear", "dare_ties", "della", "della_linear"):
        spec = from_mergekit(
            {
                "merge_method": method,
                "base_model": BASE,
                "models": [{"model": A, "parameters": {"density": 0.5, "lambda": 0.7}}, {"model": B}],
                "parameters": {"lambda": [1.0, 0.5]},
            }
        ).model_dump(mode="json")
        assert spec["method"]["params"]["rescale_rule"] == "l1_norm" and spec["method"]["params"]["rescale"] is True
        assert spec["models"][0]["parameters"] == {"density": 0.5, "lambda": 0.7}
        assert spec["method"]["params"]["scaling_factor"] == [1.0, 0.5]
        back = to_mergekit(spec)
        assert back.config is not None and "rescale_rule" not in back.config["parameters"]
        assert "same drop rates and rescaling" in back.reason and "models[0].parameters.lambda" in back.reason
        json_job = spec | {"method": {"name": method, "params": {}}}
        typed = JobSpec.model_validate(json_job).model_dump(mode="json")
        assert typed["method"]["params"]["rescale_rule"] == "keep_probability"
        assert "divided each by its keep probability" in to_mergekit(typed).reason
    assert ["parameters", "rescale_rule"] in _locs(
        {"merge_method": "dare_ties", "base_model": BASE, "models": [{"model": A}, {"model": B}],
         "parameters": {"rescale_rule": "l1_norm"}}
    )  # fmt: skip


def test_method_specific_refusals() -> None:
    assert _locs({"merge_method": "slerp", "base_model": A, "models": [{"model": B}]}) == [["parameters", "t"]]
    assert ["base_model"] in _locs(
        {"merge_method": "multislerp", "base_model": A, "models": [{"model": B}, {"model": C}]}
    )
    assert ["models", 0, "parameters", "weight"] in _locs(
        {
            "merge_method": "model_stock",
            "base_model": BASE,
            "models": [{"model": A, "parameters": {"weight": 1}}, {"model": B}],
        }
    )
    assert ["models", 0, "parameters"] in _locs(
        {
            "merge_method": "della",
            "base_model": BASE,
            "models": [{"model": A, "parameters": {"density": 0.9, "epsilon": 0.2}}, {"model": B}],
        }
    )
    assert ["parameters", "eps"] in _locs(
        {"merge_method": "multislerp", "models": [{"model": A}, {"model": B}], "parameters": {"eps": 0.1}}
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("merge_method: [", "not valid YAML"),
        ("- 1\n- 2", "must be a mapping"),
        ("", "empty"),
        ("a: &x [1, 2]\nb: *x", "aliases"),
        ("a: " + "[" * 40 + "]" * 40, "levels deep"),
        ("a: !!python/object:os.system {}", "not valid YAML"),
        ("a: 1\n---\nb: 2", "not valid YAML"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_yaml_that_does_not_parse_is_refused(text: str | bytes, fragment: str) -> None:
    with pytest.raises(MergekitConfigError) as info:
        parse_mergekit_yaml(text)
    assert fragment in str(info.value)


def test_a_billion_laughs_is_refused_before_it_is_built() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    with pytest.raises(MergekitConfigError, match="aliases"):
        parse_mergekit_yaml("\n".join(lines))


def test_media_types() -> None:
    assert all(is_yaml_media_type(t) for t in ("application/yaml", "application/x-yaml", "text/yaml; charset=utf-8"))
    assert not is_yaml_media_type("application/json") and not is_yaml_media_type(None)


# --------------------------------------------------------------------------- round trip
_FRACTION = st.floats(0.05, 0.95).map(lambda x: round(x, 3))
_WEIGHT = st.floats(0.1, 3.0).map(lambda x: round(x, 3))


def _setting(values: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    gradient = st.lists(values, min_size=1, max_size=4)
    entry = st.fixed_dictionaries(
        {"filter": st.sampled_from(["self_attn", "mlp", "embed"]), "value": values | gradient}
    )
    filters = st.lists(entry, min_size=0, max_size=2).flatmap(
        lambda head: (values | gradient).map(lambda v: [*head, {"value": v}])
    )
    return values | gradient | filters


_PER_MODEL = {
    "ties": ("density",),
    "dare_linear": ("density",),
    "dare_ties": ("density",),
    "breadcrumbs": ("density", "gamma"),
    "breadcrumbs_ties": ("density", "gamma"),
    "della": ("density", "epsilon"),
    "della_linear": ("density", "epsilon"),
    "task_arithmetic": (),
    "linear": (),
    "multislerp": (),
    "model_stock": (),
}


_LAMBDA_PER_MODEL = {m for m in _PER_MODEL if m not in ("linear", "multislerp", "model_stock")}


@st.composite
def mergekit_configs(draw: st.DrawFn) -> dict[str, Any]:
    """Configurations written as to_mergekit writes them (every per-model knob in each model, dtype given)."""
    method = draw(st.sampled_from([*_PER_MODEL, "slerp"]))
    n = draw(st.integers(2, 4)) if method != "slerp" else 2
    uris = [f"s3://models/acme/m{i}/" for i in range(n)]
    config: dict[str, Any] = {"merge_method": method}
    if method == "slerp":
        config["base_model"] = uris[0]
        config["models"] = [{"model": u} for u in uris]
        config["parameters"] = {"t": draw(_setting(st.floats(0, 1).map(lambda x: round(x, 3))))}
    else:
        if method not in ("linear", "multislerp"):
            config["base_model"] = "s3://models/acme/base/"
        models = []
        for uri in uris:
            parameters: dict[str, Any] = {}
            if method != "model_stock":
                parameters["weight"] = draw(_setting(_WEIGHT))
            if method in _LAMBDA_PER_MODEL and draw(st.booleans()):
                parameters["lambda"] = draw(_setting(st.floats(-2, 2).map(lambda x: round(x, 3))))
            for key in _PER_MODEL[method]:
                if method.startswith("della"):  # the band density +/- epsilon must stay inside (0, 1)
                    values = st.floats(0.3, 0.7).map(lambda x: round(x, 3)) if key == "density" else st.just(0.15)
                else:
                    values = _FRACTION if key == "density" else st.sampled_from([0.0, 0.01, 0.02])
                parameters[key] = draw(_setting(values))
            models.append({"model": uri, "parameters": parameters} if parameters else {"model": uri})
        config["models"] = models
        shared: dict[str, Any] = {}
        if method in (
            "linear",
            "task_arithmetic",
            *[m for m in _PER_MODEL if m not in ("linear", "multislerp", "model_stock")],
        ):
            if method != "linear":
                shared["lambda"] = draw(_setting(st.floats(-2, 2).map(lambda x: round(x, 3))))
            shared["normalize"] = draw(st.booleans())
        if method.startswith(("dare", "della")):
            shared["rescale"] = draw(st.booleans())
        elif method in ("ties", "breadcrumbs", "breadcrumbs_ties") and draw(st.booleans()):
            shared["rescale"] = True
        if method == "multislerp":
            shared["normalize_weights"] = draw(st.booleans())
        if method == "model_stock":
            shared["filter_wise"] = draw(st.booleans())
        config["parameters"] = shared
    config["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    if draw(st.booleans()):
        config["tokenizer_source"] = config["models"][-1]["model"]
    return config


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mergekit_configs())
def test_to_mergekit_of_from_mergekit_gives_the_configuration_back(config: dict[str, Any]) -> None:
    back = to_mergekit(from_mergekit(config).model_dump(mode="json"))
    assert back.config == config
    assert from_mergekit_yaml(yaml.safe_dump(config)).model_dump(mode="json") == from_mergekit(config).model_dump(
        mode="json"
    )


@settings(max_examples=100, deadline=None)
@given(mergekit_configs())
def test_any_spelling_translates_to_a_fixed_point(config: dict[str, Any]) -> None:
    """A config spelled otherwise (per-model knobs hoisted, int8_mask, name) gives an equivalent one back."""
    config = {**config, "name": "x"}
    if config["merge_method"] in ("ties", "task_arithmetic"):
        config["parameters"] = {**config["parameters"], "int8_mask": True}
    once = to_mergekit(from_mergekit(config).model_dump(mode="json")).config
    assert once is not None
    assert to_mergekit(from_mergekit(once).model_dump(mode="json")).config == once


# --------------------------------------------------------------------------- the CLI
class _FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        self.calls.append(("json", spec))
        return {"id": "mrg_x", "status": "queued"}

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append(("yaml", kwargs))
        job = {"id": "mrg_y", "status": "queued"}
        return type("R", (), {"json": lambda self: job})()


def test_mudsc_submit_sends_a_mergekit_file_as_yaml(tmp_path: Any) -> None:
    from mudsc_client.cli import submit_file

    mergekit_file = tmp_path / "config.yml"
    mergekit_file.write_text(f"merge_method: linear\nmodels:\n  - model: {A}\n  - model: {B}\n")
    ours = tmp_path / "spec.yaml"
    ours.write_text(f"method: {{name: linear}}\nmodels: [{{uri: {A}}}, {{uri: {B}}}]\n")
    client = _FakeClient()
    assert submit_file(client, str(mergekit_file), idempotency_key="k")["id"] == "mrg_y"  # type: ignore[arg-type]
    kind, kwargs = client.calls[-1]
    assert kind == "yaml" and kwargs["headers"] == {"Content-Type": "application/yaml", "Idempotency-Key": "k"}
    assert kwargs["content"] == mergekit_file.read_bytes()
    assert submit_file(client, str(ours))["id"] == "mrg_x"  # type: ignore[arg-type]
    assert client.calls[-1][0] == "json"


def test_a_filter_list_without_a_catch_all_falls_back_to_mergekit_s_default() -> None:
    spec = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": BASE,
            "models": [{"model": A}, {"model": B}],
            "parameters": {"density": [{"filter": "mlp", "value": 0.3}]},
        }
    )
    assert spec.method.params["density"] == [{"filter": "mlp", "value": 0.3}, {"filter": None, "value": 1.0}]
