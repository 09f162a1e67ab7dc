"""Parity with mergekit (test-only dependency, pinned in the dev extra): the same YAML through mergekit's
Python API and through our core gives the same tensors.

A tiny random Llama (2 layers, hidden 32, float32: ``transformers`` builds it from a config, nothing is
downloaded) is saved as a base and three fine-tunes in local folders. Each configuration names the models
by s3:// URIs (what the API takes); our side translates it (``from_mergekit``) and merges the local folders
with ``mudsc_core.files.merge_files``; mergekit's side gets the same configuration with local paths and runs
``run_merge`` on CPU (lazy unpickle off). Deterministic methods: equal to 1e-5. DARE/DELLA: survival rates
within 3 sigma of the keep probability and survivors scaled as each side defines it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_llama import tiny_llama

transformers = pytest.importorskip("transformers")
mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mudsc_core.files import LocalInputs, merge_files  # noqa: E402
from mudsc_core.schema.mergekit import from_mergekit  # noqa: E402

NAMES = ("base", "a", "b", "c")
URI = {name: f"s3://models/acme/{name}/" for name in NAMES}
TOL = 1e-5


def _llama(seed: int, base: Any | None = None, scale: float = 0.02) -> Any:
    return tiny_llama(seed, base, scale=scale)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    base = _llama(0)
    paths = {}
    for i, name in enumerate(NAMES):
        model = base if name == "base" else _llama(i, base)
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(file).items()})
    return out


def _run_both(config: dict[str, Any], folders: dict[str, Path], out: Path) -> tuple[dict, dict]:
    spec = from_mergekit(config)
    local = {URI[n]: folders[n] for n in NAMES}
    ours = out / "ours"
    merge_files(
        spec,
        LocalInputs(
            models=[local[m.uri] for m in spec.models],
            base_model=local[spec.base_model.uri] if spec.base_model else None,
        ),
        ours,
        device="cpu",
    )
    theirs_config = copy.deepcopy(config)
    for key in ("base_model",):
        if key in theirs_config:
            theirs_config[key] = str(local[theirs_config[key]])
    for entry in theirs_config["models"]:
        entry["model"] = str(local[entry["model"]])
    theirs = out / "theirs"
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(theirs_config),
        str(theirs),
        options=MergeOptions(cuda=False, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False),
    )
    return _tensors(ours), _tensors(theirs)


def _max_diff(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


def _models(*parameters: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": URI[n], "parameters": p} for n, p in zip(("a", "b", "c"), parameters)]


LAYER_GRADIENT = [0.3, 0.9]  # a layer gradient: 0.3 at layer 0 (and outside the layers), 0.9 at layer 1
DETERMINISTIC = {
    "linear": {"merge_method": "linear", "models": _models({"weight": 1.0}, {"weight": [0.5, 2.0]}, {"weight": 0.7})},
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": URI["base"],
        "models": _models({"weight": 0.6}, {"weight": LAYER_GRADIENT}, {"weight": 0.2}),
        "parameters": {"lambda": 0.8},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": URI["base"],
        "models": _models({"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": LAYER_GRADIENT}, {"weight": 0.8, "density": 0.2}),
        "parameters": {"lambda": 1.2, "normalize": True},
    },
    "ties_rescaled": {
        "merge_method": "ties",
        "base_model": URI["base"],
        "models": _models({"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.7}, {"value": 0.3}]}),
        "parameters": {"rescale": True},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": URI["base"],
        "models": _models({"weight": 1.0, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": LAYER_GRADIENT, "gamma": 0.02}),
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": URI["base"],
        "models": _models({"weight": 1.0, "density": 0.7}, {"weight": 0.5, "density": 0.9, "gamma": 0.1}, {"weight": 1.0, "density": 0.5}),
        "parameters": {"normalize": True, "gamma": 0.03},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": URI["a"],
        "models": [{"model": URI["a"]}, {"model": URI["b"]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.4}]},
    },
    "multislerp": {"merge_method": "multislerp", "models": _models({"weight": 1.0}, {"weight": 0.5}, {"weight": 2.0})},
    "model_stock": {"merge_method": "model_stock", "base_model": URI["base"], "models": _models({}, {}, {})},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_methods_equal_mergekit(name: str, folders: dict[str, Path], tmp_path: Path) -> None:
    config = DETERMINISTIC[name]
    ours, theirs = _run_both(config, folders, tmp_path)
    gap = _max_diff(ours, theirs)
    print(f"parity {name}: max |ours - mergekit| = {gap:.3g}")
    assert gap <= TOL, f"{name}: {gap}"


RANDOM_CASES = [("dare_linear", 0.3, None), ("dare_ties", 0.6, None), ("della", 0.4, 0.15), ("della_linear", 0.5, 0.2)]


def _drop_statistics(result: dict, base: dict, delta: dict) -> dict[str, Any]:
    """Per tensor (>= 512 entries): survivors, the L1 and L2 norms of the sparsified task vector relative to the
    task vector's, and the survivors' scale (out / tau on the survivors: its mean and its spread)."""
    kept = total = 0
    l1, l2, scale, spread = [], [], [], []
    for key, d in delta.items():
        if d.numel() < 512:
            continue
        out = (result[key] - base[key]).double()
        survived = out != 0
        kept += int(survived.sum())
        total += d.numel()
        l1.append(float(out.abs().sum() / d.double().abs().sum()))
        l2.append(float(out.norm() / d.double().norm()))
        ratio = out[survived] / d.double()[survived]
        scale.append(float(ratio.mean()))
        spread.append(float(ratio.std() / ratio.mean()))
    return {"rate": kept / total, "total": total, "l1": l1, "l2": l2, "scale": scale, "spread": spread}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / len(values) ** 0.5)


@pytest.mark.parametrize(("method", "density", "epsilon"), RANDOM_CASES)
def test_random_drops_have_mergekit_s_survival_rate_and_rescaling(
    method: str, density: float, epsilon: float | None, folders: dict[str, Path], tmp_path: Path
) -> None:
    """DARE/DELLA from a mergekit YAML (rescale_rule 'l1_norm'): the same survival rate as mergekit 0.1.5 (within
    3 sigma of the keep probability and of each other) and the same rescaling: every tensor keeps its L1 norm
    exactly on both sides, its survivors share one factor, and the factors and L2 norms agree statistically."""
    # The second model is the base itself (task vector 0), so the result minus the base is the first
    # model's sparsified task vector (weight 1, lambda 1, no normalisation).
    own = {"weight": 1.0, "density": density, **({"epsilon": epsilon} if epsilon is not None else {})}
    config: dict[str, Any] = {
        "merge_method": method,
        "base_model": URI["base"],
        "models": _models(own, dict(own)),
        "parameters": {"normalize": False, "rescale": True},
    }
    assert from_mergekit(config).method.params["rescale_rule"] == "l1_norm"
    base = _tensors(folders["base"])
    delta = {k: v - base[k] for k, v in _tensors(folders["a"]).items()}
    b_folder = tmp_path / "b_is_base"
    transformers.LlamaForCausalLM.from_pretrained(folders["base"]).save_pretrained(b_folder)
    folders = {**folders, "b": b_folder}
    torch.manual_seed(1234)  # mergekit draws its masks from torch's global generator: a reproducible test
    ours, theirs = _run_both(config, folders, tmp_path)
    stats = {side: _drop_statistics(result, base, delta) for side, result in (("ours", ours), ("mergekit", theirs))}
    sigma = (density * (1 - density) / stats["ours"]["total"]) ** 0.5  # DELLA's spread of p_i only lowers it
    for side, st in stats.items():
        l1, l1_sd = _mean_sd(st["l1"])
        l2, l2_sd = _mean_sd(st["l2"])
        scale, scale_sd = _mean_sd(st["scale"])
        print(f"parity {method} {side}: survival {st['rate']:.4f} (density {density}, 3 sigma {3 * sigma:.4f}); "
              f"per tensor |out|_1/|tau|_1 {l1:.6f}, |out|_2/|tau|_2 {l2:.4f} +- {l2_sd:.4f}, survivor scale "
              f"{scale:.4f} +- {scale_sd:.4f} (1/density {1 / density:.4f}), max spread within a tensor "
              f"{max(st['spread']):.2g}")  # fmt: skip
        assert abs(st["rate"] - density) <= 3 * sigma, (side, st["rate"])
        # mergekit's rule: each tensor's survivors times ||tau||_1 / ||kept||_1, one factor per tensor
        assert max(abs(x - 1.0) for x in st["l1"]) < 1e-5, side
        assert max(st["spread"]) < 1e-5, side
    a, b = stats["ours"], stats["mergekit"]
    assert abs(a["rate"] - b["rate"]) <= 3 * 2**0.5 * sigma
    for key in ("scale", "l2"):
        (mean_a, sd_a), (mean_b, sd_b) = _mean_sd(a[key]), _mean_sd(b[key])
        assert abs(mean_a - mean_b) <= 4 * (sd_a**2 + sd_b**2) ** 0.5, (key, mean_a, mean_b)


def test_a_json_dare_job_keeps_the_papers_rescaling(folders: dict[str, Path], tmp_path: Path) -> None:
    """The JSON default (rescale_rule 'keep_probability'): DARE survivors are exactly tau / density, so a tensor's
    L1 norm is kept in expectation only; DELLA's survivors are tau / p_i (no common factor)."""
    from mudsc_core.schema import JobSpec

    base = _tensors(folders["base"])
    delta = {k: v - base[k] for k, v in _tensors(folders["a"]).items()}
    for method, density in (("dare_linear", 0.3), ("della_linear", 0.4)):
        spec = JobSpec.model_validate(
            {
                "method": {"name": method, "params": {"density": density}},
                "base_model": {"uri": URI["base"]},
                "models": [{"uri": URI["a"]}, {"uri": URI["b"]}],
            }
        )
        assert spec.method.params["rescale_rule"] == "keep_probability"
        out = tmp_path / method
        merge_files(spec, LocalInputs(models=[folders["a"], folders["base"]], base_model=folders["base"]), out,
                    device="cpu")  # fmt: skip
        st = _drop_statistics(_tensors(out), base, delta)
        l1, l1_sd = _mean_sd(st["l1"])
        scale, _ = _mean_sd(st["scale"])
        print(f"{method} rescale_rule keep_probability: survival {st['rate']:.4f}, |out|_1/|tau|_1 {l1:.4f} +- "
              f"{l1_sd:.4f}, survivor scale {scale:.4f}, max spread within a tensor {max(st['spread']):.2g}")  # fmt: skip
        assert abs(l1 - 1.0) <= 4 * l1_sd + 0.02
        if method == "dare_linear":
            assert max(abs(x - 1 / density) for x in st["scale"]) < 1e-4 and max(st["spread"]) < 1e-5
        else:
            assert min(st["spread"]) > 0.05  # 1/p_i varies with the magnitude rank
