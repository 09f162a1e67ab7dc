"""A test bed of real task vectors: an MLP on scikit-learn's digits, fine-tuned on four transforms.

- Pre-training: an MLP body (64 -> 128 -> 128, ReLU) with a head on the plain digits.
- Tasks: rotated 90 degrees, pixels permuted (fixed), flipped left-right, shifted one pixel.
  Each task gets its own head, fitted as a linear probe on the *base* body's features and then
  frozen (as CLIP task-arithmetic setups keep a fixed zero-shot head); only the body is
  fine-tuned. Task vectors are therefore body-only.
- Heads are kept out of the merge: the checkpoints handed to ``merge_checkpoints`` hold the
  body only; a merged body is evaluated on each task with that task's own head.
- Every same-base method merges the four fine-tuned bodies (slerp, which takes two models,
  merges the first two). Methods with ``scaling_factor`` pick lambda from a small grid on a
  validation split; accuracies are on a held-out test split.

    python bench/task_vectors.py        # prints the table (about half a minute on 2 cores)
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mudsc_core.io import load_state_dict  # noqa: E402
from mudsc_core.same_base.stream import merge_checkpoints  # noqa: E402
from mudsc_core.schema.methods import METHODS  # noqa: E402

TASKS = ("rotate", "permute", "flip", "shift")
LAMBDAS = (0.3, 0.5, 0.7, 1.0)
PROBE_EPOCHS = 5  # a short linear probe: the head is fixed, the body learns the task
FINETUNE_EPOCHS = 10
ALL_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "linear",
    "slerp",
    "multislerp",
    "model_stock",
    "tsv_merge",
    "iso_c",
    "iso_cts",
)
PARAMS = {
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "della": {"density": 0.5},
    "della_linear": {"density": 0.5},
}


def transform(images: np.ndarray, task: str) -> np.ndarray:
    grid = images.reshape(-1, 8, 8)
    if task == "rotate":
        grid = np.rot90(grid, 1, axes=(1, 2))
    elif task == "permute":  # a fixed pixel permutation (as permuted MNIST)
        grid = grid.reshape(-1, 64)[:, np.random.default_rng(1234).permutation(64)].reshape(-1, 8, 8)
    elif task == "flip":
        grid = grid[:, :, ::-1]
    elif task == "shift":
        grid = np.roll(grid, (1, 1), axis=(1, 2))
        grid[:, 0, :] = 0.0
        grid[:, :, 0] = 0.0
    return np.ascontiguousarray(grid.reshape(-1, 64), dtype=np.float32)


def body() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class TestBed:
    base: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, nn.Linear]
    val: dict[str, Split]
    test: dict[str, Split]


def _train(params, forward, split: Split, epochs: int, lr: float, seed: int) -> None:
    optimizer = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(split.y), generator=g)
        for start in range(0, len(order), 128):
            idx = order[start : start + 128]
            loss = nn.functional.cross_entropy(forward(split.x[idx]), split.y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def build(seed: int = 0) -> TestBed:
    from sklearn.datasets import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny MLP: threads only add contention on a shared machine
    try:
        return _build(seed, load_digits())
    finally:
        torch.set_num_threads(threads)


def _build(seed: int, digits) -> TestBed:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    parts = {"train": order[:1100], "val": order[1100:1400], "test": order[1400:]}

    def split(task: str | None, part: str) -> Split:
        idx = parts[part]
        data = x[idx] if task is None else transform(x[idx], task)
        return Split(torch.from_numpy(data), torch.from_numpy(y[idx]))

    base_body, base_head = body(), nn.Linear(128, 10)
    _train(
        list(base_body.parameters()) + list(base_head.parameters()),
        lambda v: base_head(base_body(v)),
        split(None, "train"),
        epochs=30,
        lr=3e-3,
        seed=seed,
    )
    base = {k: v.detach().clone() for k, v in base_body.state_dict().items()}

    finetuned, heads = {}, {}
    for t, task in enumerate(TASKS):
        train = split(task, "train")
        head = nn.Linear(128, 10)
        with torch.no_grad():
            features = base_body(train.x)
        _train(head.parameters(), head, Split(features, train.y), epochs=PROBE_EPOCHS, lr=1e-2, seed=seed + t)
        head.requires_grad_(False)
        model = body()
        model.load_state_dict(base)
        _train(
            model.parameters(),
            lambda v, m=model, h=head: h(m(v)),
            train,
            epochs=FINETUNE_EPOCHS,
            lr=1e-3,
            seed=seed + t,
        )
        finetuned[task] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        heads[task] = head
    return TestBed(base, finetuned, heads, {t: split(t, "val") for t in TASKS}, {t: split(t, "test") for t in TASKS})


def accuracy(state: dict[str, torch.Tensor], head: nn.Linear, data: Split) -> float:
    model = body()
    model.load_state_dict(state)
    with torch.no_grad():
        return float((head(model(data.x)).argmax(1) == data.y).float().mean())


def accuracies(bed: TestBed, state: dict[str, torch.Tensor], part: str = "test") -> dict[str, float]:
    splits = bed.test if part == "test" else bed.val
    return {t: accuracy(state, bed.heads[t], splits[t]) for t in TASKS}


def merge(bed: TestBed, method: str, work: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge the fine-tuned bodies from files with ``merge_checkpoints``; lambda tuned on validation."""
    work.mkdir(parents=True, exist_ok=True)
    base_path = work / "base.safetensors"
    if not base_path.exists():
        save_file(bed.base, base_path)
        for task in TASKS:
            save_file(bed.finetuned[task], work / f"{task}.safetensors")
    info = METHODS[method]
    tasks = TASKS[:2] if info.max_models == 2 else TASKS
    models = [work / f"{t}.safetensors" for t in tasks]
    base = base_path if info.requires_base else None
    params = dict(PARAMS.get(method, {}))
    grid = LAMBDAS if "scaling_factor" in info.params.model_fields else (None,)
    best: tuple[float, dict[str, torch.Tensor], dict] | None = None
    for lam in grid:
        if lam is not None:
            params["scaling_factor"] = lam
        out = work / f"out_{method}"
        merge_checkpoints(
            method, params, models, base, [1.0] * len(models), out, dtype="float32", shard_size_bytes=2**30
        )
        state = load_state_dict(out)
        score = float(np.mean(list(accuracies(bed, state, "val").values())))
        if best is None or score > best[0]:
            best = (score, state, dict(params))
    assert best is not None
    return best[1], best[2]


def table(methods: tuple[str, ...] = ALL_METHODS, seed: int = 0) -> dict[str, dict[str, float]]:
    bed = build(seed)
    rows = {"base": accuracies(bed, bed.base)}
    rows.update({f"finetuned[{t}]": accuracies(bed, bed.finetuned[t]) for t in TASKS})
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            state, params = merge(bed, method, Path(tmp))
            label = method + (f" (lambda={params['scaling_factor']})" if "scaling_factor" in params else "")
            rows[label] = accuracies(bed, state)
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    header = f"{'model':<34}" + "".join(f"{t:>9}" for t in TASKS) + f"{'mean':>9}"
    lines = [header, "-" * len(header)]
    for label, acc in rows.items():
        lines.append(
            f"{label:<34}" + "".join(f"{acc[t]:>9.3f}" for t in TASKS) + f"{np.mean(list(acc.values())):>9.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(format_table(table()))
