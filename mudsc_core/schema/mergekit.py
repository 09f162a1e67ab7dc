"""mergekit configurations (torch-free): the YAML a mergekit user would write for a job of ours.

mergekit (``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``) names some of our parameters differently (``scaling_factor`` is its ``lambda``) and has
no counterpart for others (our ``seed``; TIES's ``consensus: count`` and ``topk_scope: model``). A
method whose configuration mergekit cannot express gets no YAML, with the reason.

Per-model parameters (``models[i].parameters``) go to mergekit's ``models[i].parameters``, where
they override the method's per-model knobs given in ``method.params`` (which are written into every
model's parameters, as before); gradients stay lists of numbers and filter lists stay lists of
``{filter, value}`` (an entry without a filter is written as ``{value: ...}``), as mergekit reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

# Our parameter -> mergekit's, where the names differ.
_RENAMED = {"scaling_factor": "lambda"}
# Parameters mergekit takes per model (in ``models[i].parameters``) rather than globally.
_PER_MODEL = frozenset({"weight", "density", "gamma", "epsilon"})
# Our parameters with no mergekit counterpart (the two that change results are checked before they are dropped).
_NOT_IN_MERGEKIT = ("seed", "consensus", "topk_scope")
_RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}
_METHODS = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "multislerp",
    "model_stock",
}
_TIES_LIKE = {"ties", "dare_ties", "breadcrumbs_ties", "della"}


@dataclass(frozen=True)
class MergekitConfig:
    """The equivalent configuration as a mapping (``yaml`` renders it), or why there is none."""

    config: dict[str, Any] | None
    reason: str = ""

    @property
    def yaml(self) -> str | None:
        return None if self.config is None else yaml.safe_dump(self.config, sort_keys=False)


def _setting(value: Any) -> Any:
    """A parameter value as mergekit writes it: filter entries without a filter lose the null key."""
    if isinstance(value, list):
        return [
            {k: v for k, v in entry.items() if not (k == "filter" and v is None)} if isinstance(entry, dict) else entry
            for entry in value
        ]
    return value


def _model_parameters(model: dict[str, Any], per_model: dict[str, Any]) -> dict[str, Any]:
    own = dict(model.get("parameters") or {})
    weight = own.pop("weight", model.get("weight", 1.0))
    return {k: _setting(v) for k, v in {"weight": weight, **per_model, **own}.items()}


def to_mergekit(spec: dict[str, Any]) -> MergekitConfig:
    """The mergekit configuration of a job spec (as ``JobSpec.model_dump(mode="json")`` gives it)."""
    method = spec["method"]["name"]
    params = dict(spec["method"].get("params") or {})
    if method not in _METHODS:
        return MergekitConfig(None, f"mergekit has no {method!r} method")
    if method in _TIES_LIKE and params.get("consensus", "sum") != "sum":
        return MergekitConfig(None, f"mergekit's sign election is 'sum' only; this job uses {params['consensus']!r}")
    if params.get("topk_scope", "tensor") != "tensor":
        return MergekitConfig(None, "mergekit trims each tensor on its own (topk_scope 'tensor')")
    for key in _NOT_IN_MERGEKIT:
        params.pop(key, None)
    if method not in _RANDOM:  # mergekit rescales survivors of random drops only
        params.pop("rescale", None)
    per_model = {k: v for k, v in params.items() if k in _PER_MODEL}
    shared = {_RENAMED.get(k, k): v for k, v in params.items() if k not in _PER_MODEL}
    shared = {k: _setting(v) for k, v in shared.items()}
    models = [{"model": m["uri"], "parameters": _model_parameters(m, per_model)} for m in spec["models"]]
    config: dict[str, Any] = {"merge_method": method}
    if method == "slerp":  # mergekit interpolates from its base model (t = 0) to the other model
        config["base_model"] = spec["models"][0]["uri"]
        models = [{"model": m["uri"]} for m in spec["models"]]
    elif spec.get("base_model"):
        config["base_model"] = spec["base_model"]["uri"]
    config["models"] = models
    if shared:
        config["parameters"] = shared
    config["dtype"] = spec.get("output", {}).get("dtype", "float32")
    reason = (
        "same drop rates and rescaling; mergekit draws its random masks itself (no seed)" if method in _RANDOM else ""
    )
    return MergekitConfig(config, reason)
