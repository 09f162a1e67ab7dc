"""``beta: "auto"``: MuDSC's weight/activation mix chosen from calibration inputs alone, without labels.

The calibration inputs are split: the first part gives the activation statistics (collected once), the
held-out rest scores candidates. Every beta of :data:`GRID` (both single spaces included) is matched,
merged and BatchNorm-reset; its score is how well the merged model reproduces the input models on the
held-out inputs:

- a shared head (logits): minus the KL divergence from the average of the models' softmax outputs to the
  merged model's;
- separate heads: minus the KL from the softmax over the models' concatenated logits (what the input models
  predict together, as the merged model's concatenated heads are read) to the merged model's. This scores
  each head's agreement with its own model and the heads' calibration against each other, which decides the
  joint prediction; scoring each head on its own slice alone picked worse betas on the digits bed (disjoint
  tasks: 0.5 points lower joint accuracy on average, docs/mudsc_quality.md);
- a features output: minus the relative squared error of the merged features to each model's (to model 0's
  alone when the output groups were free, the merge being in model 0's order).

Padded positions (``attention_mask`` 0) do not count. The candidate with the highest score wins (ties: the
one nearest 0.5); the report lists every candidate's score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.errors import InvalidCalibration
from mudsc_core.permutation.similarity import Batch, batch_samples, batch_slice

GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
HELD_OUT_FRACTION = 0.25
MIN_SAMPLES = 8  # on each side of the split


@dataclass(frozen=True)
class Candidate:
    beta: float
    score: float
    objective: float | None = None


def split(calibration: Batch) -> tuple[Batch, Batch]:
    """(statistics part, held-out part): the last quarter (at least :data:`MIN_SAMPLES`) is held out."""
    total = batch_samples(calibration)
    held = max(MIN_SAMPLES, int(total * HELD_OUT_FRACTION))
    if total - held < MIN_SAMPLES:
        raise InvalidCalibration(
            f'beta "auto" holds out calibration inputs to score candidates: it needs at least {2 * MIN_SAMPLES} '
            f"samples, got {total}"
        )
    return batch_slice(calibration, 0, total - held), batch_slice(calibration, total - held, None)


def _output(value: Any) -> Tensor:
    """The first floating-point tensor of a model's output (logits of a classifier or LM, hidden states)."""
    if isinstance(value, Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, Tensor) and item.is_floating_point():
            return item
    raise InvalidCalibration('beta "auto" found no tensor output to score the candidates with')


def _positions(output: Tensor, batch: Batch) -> Tensor:
    """(positions, features): every leading position a row; padded tokens dropped."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None and output.ndim >= 3 and tuple(output.shape[:2]) == tuple(mask.shape):
        output = output[mask.to(torch.bool)]
    return output.reshape(-1, output.shape[-1]).to(torch.float64)


class Scorer:
    """Scores a merged network by its agreement with the input networks on held-out batches."""

    def __init__(
        self,
        networks: Sequence[nn.Module],
        batches: Sequence[Batch],
        forward: Callable[[nn.Module, Batch], Any],
        *,
        heads: str,
        features: bool,
        model_zero_order: bool,
    ) -> None:
        self.batches, self.forward = list(batches), forward
        self.heads, self.features = heads, features
        with torch.no_grad():
            self.references = [[self._out(net, b) for b in self.batches] for net in networks]
        if features and model_zero_order:
            self.references = self.references[:1]

    def _out(self, network: nn.Module, batch: Batch) -> Tensor:
        return _positions(_output(self.forward(network, batch)), batch)

    def __call__(self, merged: nn.Module) -> float:
        with torch.no_grad():
            outputs = [self._out(merged, b) for b in self.batches]
        scores = []
        for k, merged_out in enumerate(outputs):
            refs = [model[k] for model in self.references]
            if self.features:
                scores += [-float(((merged_out - r) ** 2).sum() / (r**2).sum().clamp_min(1e-12)) for r in refs]
            elif self.heads == "separate":
                scores.append(-_kl(torch.cat(refs, dim=-1).softmax(-1), merged_out))
            else:
                scores.append(-_kl(torch.stack([r.softmax(-1) for r in refs]).mean(0), merged_out))
        return sum(scores) / len(scores)


def _kl(target: Tensor, logits: Tensor) -> float:
    """Mean over rows of KL(target || softmax(logits))."""
    log_q = logits.log_softmax(-1)
    return float((target * (target.clamp_min(1e-12).log() - log_q)).sum(-1).mean())


def choose(
    candidates: Callable[[float], tuple[Any, Mapping[str, Tensor], float | None]],
    score: Callable[[Mapping[str, Tensor]], float],
    grid: Sequence[float] = GRID,
) -> tuple[float, Any, Mapping[str, Tensor], list[Candidate]]:
    """Evaluate ``candidates(beta) -> (outcome, merged state, objective)`` on the grid; the best by ``score``."""
    best: tuple[float, float, Any, Mapping[str, Tensor]] | None = None
    scored = []
    for beta in grid:
        outcome, merged, objective = candidates(beta)
        value = score(merged)
        scored.append(Candidate(beta, value, objective))
        if best is None or (value, -abs(beta - 0.5)) > (best[0], -abs(best[1] - 0.5)):
            best = (value, beta, outcome, merged)
    assert best is not None
    return best[1], best[2], best[3], scored
