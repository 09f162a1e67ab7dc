"""mergekit configurations (torch-free): the YAML a mergekit user would write for a job of ours.

mergekit (``merge_method``, ``base_model``, ``models: [{model, parameters}]``, ``parameters``,
``dtype``) names some of our parameters differently (``scaling_factor`` is its ``lambda``) and has
no counterpart for others (our ``seed``; TIES's ``consensus: count`` and ``topk_scope: model``). A
method whose configuration mergekit cannot express gets no YAML, with the reason.
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
    models = [{"model": m["uri"], "parameters": {"weight": m.get("weight", 1.0), **per_model}} for m in spec["models"]]
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
