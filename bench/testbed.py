"""A test bed built from scikit-learn's bundled 8x8 digits (no downloads).

Small models trained in seconds on CPU from different seeds, on the same task or on
disjoint label halves (0-4 vs 5-9, each model with its own 5-way head). Used by the tests,
the demo and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.architectures import build_model


@dataclass(frozen=True)
class Digits:
    x_train: Tensor  # (N, 1, 8, 8) float32, standardised
    y_train: Tensor  # (N,) long
    x_test: Tensor
    y_test: Tensor


def load_digits_data(test_fraction: float = 0.3, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(len(y) * (1 - test_fraction))
    mean, std = x[:split].mean(), x[:split].std()
    x = (x - mean) / std
    return Digits(x[:split], y[:split], x[split:], y[split:])


def task_subset(x: Tensor, y: Tensor, labels: range) -> tuple[Tensor, Tensor]:
    """Samples whose label is in ``labels``, relabelled 0..len(labels)-1."""
    keep = (y >= labels.start) & (y < labels.stop)
    return x[keep], y[keep] - labels.start


def inputs_for(architecture: Mapping[str, Any], x: Tensor) -> Tensor:
    return x.flatten(1) if architecture["name"] == "mlp" else x


def train(
    architecture: Mapping[str, Any],
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Adam + cross-entropy from a seeded initialisation; returns the state dict."""
    torch.manual_seed(seed)
    model = build_model(architecture)
    x = inputs_for(architecture, x)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:
                continue
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
        schedule.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(architecture: Mapping[str, Any], state: Mapping[str, Tensor], x: Tensor) -> Tensor:
    model = build_model(architecture)
    model.load_state_dict(dict(state))
    model.eval()
    with torch.no_grad():
        return model(inputs_for(architecture, x))


def accuracy(architecture: Mapping[str, Any], state: Mapping[str, Tensor], x: Tensor, y: Tensor) -> float:
    return float((logits(architecture, state, x).argmax(1) == y).float().mean())


def with_classes(architecture: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    return {"name": architecture["name"], "config": {**architecture["config"], "num_classes": num_classes}}


SPLITS = (range(0, 5), range(5, 10))


def disjoint_scores(
    architecture: Mapping[str, Any], merged_state: Mapping[str, Tensor], data: Digits
) -> dict[str, float]:
    """A merged model whose heads were kept separate (5 logits per task, concatenated).

    joint: argmax over all 10 logits on the whole test set; task_k: argmax inside task k's
    own 5 logits on task k's test samples.
    """
    out = logits(with_classes(architecture, 10), merged_state, data.x_test)
    scores = {"joint": float((out.argmax(1) == data.y_test).float().mean())}
    for k, labels in enumerate(SPLITS):
        keep = (data.y_test >= labels.start) & (data.y_test < labels.stop)
        task_logits = out[keep][:, labels.start : labels.stop]
        scores[f"task{k}"] = float((task_logits.argmax(1) == data.y_test[keep] - labels.start).float().mean())
    return scores
