"""Transformer test bed: small Hugging Face models trained from seeds on the digits, then merged.

Nothing is downloaded: scikit-learn's bundled 8x8 digits (the split of ``bench.testbed.load_digits_data``:
1257 train / 540 test) and models built from config classes with random weights, trained here on CPU in
seconds. Three families, each 2 layers, width 64, 4 heads, MLP width 128:

- ``bert``  ``BertForSequenceClassification`` on the digit as a token sequence: the image downsampled to
  4x4 (each 2x2 block's pixel sum // 4, an intensity 0..16), one token per cell in reading order, behind a
  [CLS] token (id 17) that the pooler reads: 17 tokens, vocabulary 18.
- ``gpt2``  ``GPT2ForSequenceClassification`` (causal) on the same tokens with the class token at the END,
  the last position being the one its head reads (``pad_token_id`` 18 never occurs): 17 tokens, vocabulary 19.
- ``vit``   ``ViTForImageClassification`` on the 8x8 image itself (one channel, standardised), patch 2:
  16 patches + [CLS].

Every model of a family is trained with the same protocol (:func:`train`: AdamW, one-cycle schedule, no
dropout) from its own seed; two seeds make a pair, merged with every permutation method (:data:`METHODS`)
on calibration inputs taken from the training set (:func:`calibration`) and scored on the held-out split.
There are no BatchNorm statistics to reset (LayerNorm only). ``bench/transformer_testbed.py`` tabulates
3 seed pairs (docs/mudsc_transformers.md); tests/unit/test_transformer_testbed.py asserts its margins.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.errors import MergeError
from mudsc_core.permutation.merge import MergeResult, merge

FAMILIES = ("bert", "gpt2", "vit")
WIDTH, LAYERS, HEADS, MLP_WIDTH = 64, 2, 4, 128
INTENSITIES = 17  # token ids 0..16: a 4x4 cell's intensity
CLS = INTENSITIES  # 17
PAD = INTENSITIES + 1  # 18: GPT-2's pad id (never in the data; it finds the last real token by it)
TOKENS = 16 + 1
EPOCHS = 20
LR = 1e-3
BATCH = 32
CALIBRATION = 256  # first training samples
CLASSES = 10

# (label, method name, params)
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("weight_average", "weight_average", {}),
    ("git_rebasin", "git_rebasin", {}),
    ("weight_zip", "weight_zip", {}),
    ("activation_align", "activation_align", {}),
    ("zipit", "zipit", {}),
    ("mudsc align", "mudsc", {"mode": "align", "beta": 0.5}),
    ("mudsc zip", "mudsc", {"mode": "zip", "beta": 0.5}),
    # REPAIR (LayerNorm models have no BatchNorm to reset): merged units renormalised to the interpolated stats
    ("mudsc align + repair", "mudsc", {"mode": "align", "beta": 0.5, "repair": True}),
    ("mudsc zip + repair", "mudsc", {"mode": "zip", "beta": 0.5, "repair": True}),
)


@dataclass(frozen=True)
class Digits:
    """Both views of the same split: 4x4 token sequences (text families) and 8x8 images (ViT)."""

    cells_train: Tensor  # (N, 16) long, intensities 0..16
    pixels_train: Tensor  # (N, 1, 8, 8) float, standardised with the train statistics
    y_train: Tensor
    cells_test: Tensor
    pixels_test: Tensor
    y_test: Tensor


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Digits:
    """The digits, shuffled and split as ``bench.testbed.load_digits_data`` does (same samples each side)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    raw = torch.tensor(bunch.data, dtype=torch.long).reshape(-1, 8, 8)  # intensities 0..16
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    raw, y = raw[order], y[order]
    cells = (raw.reshape(-1, 4, 2, 4, 2).sum((2, 4)) // 4).reshape(-1, 16)  # (N, 16), 0..16
    pixels = raw.reshape(-1, 1, 8, 8).float() / 16.0
    split = int(len(y) * (1 - test_fraction))
    mean, std = pixels[:split].mean(), pixels[:split].std()
    pixels = (pixels - mean) / std
    return Digits(cells[:split], pixels[:split], y[:split], cells[split:], pixels[split:], y[split:])


def config(family: str) -> Any:
    """The family's transformers config (dropout off: the runs are short and deterministic)."""
    import transformers

    if family == "bert":
        return transformers.BertConfig(
            vocab_size=INTENSITIES + 1,
            hidden_size=WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=MLP_WIDTH,
            max_position_embeddings=TOKENS,
            type_vocab_size=1,
            num_labels=CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            architectures=["BertForSequenceClassification"],
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=INTENSITIES + 2,
            n_embd=WIDTH,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=MLP_WIDTH,
            n_positions=TOKENS,
            num_labels=CLASSES,
            pad_token_id=PAD,
            bos_token_id=CLS,
            eos_token_id=CLS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            architectures=["GPT2ForSequenceClassification"],
        )
    if family == "vit":
        return transformers.ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=WIDTH,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=MLP_WIDTH,
            num_labels=CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            architectures=["ViTForImageClassification"],
        )
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def architecture(family: str) -> dict[str, Any]:
    """The ``architecture`` argument of :func:`mudsc_core.permutation.merge.merge`."""
    return {"name": "transformers", "config": config(family).to_dict()}


def build(family: str) -> nn.Module:
    import transformers

    made = config(family)
    model: nn.Module = getattr(transformers, made.architectures[0])(made)
    return model


def inputs(family: str, data: Digits, split: str, count: int | None = None) -> dict[str, Tensor]:
    """Forward keywords for ``split`` ("train" | "test"), the first ``count`` samples (None: all)."""
    if split not in ("train", "test"):
        raise ValueError(split)
    if family == "vit":
        return {"pixel_values": getattr(data, f"pixels_{split}")[:count]}
    cells = getattr(data, f"cells_{split}")[:count]
    cls = torch.full((len(cells), 1), CLS, dtype=torch.long)
    ids = torch.cat([cls, cells], 1) if family == "bert" else torch.cat([cells, cls], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def calibration(family: str, data: Digits, count: int | None = None) -> dict[str, Tensor]:
    """The merge's calibration inputs: the first ``count`` training samples (None: :data:`CALIBRATION`)."""
    return inputs(family, data, "train", CALIBRATION if count is None else count)


def _take(batch: Mapping[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    return {name: t[index] for name, t in batch.items()}


def train(
    family: str, data: Digits, *, seed: int, epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH
) -> dict[str, Tensor]:
    """AdamW (weight decay 0.01) + cross-entropy, one-cycle schedule, from a seeded init; the state dict."""
    torch.manual_seed(seed)
    model = build(family)
    x, y = inputs(family, data, "train"), data.y_train
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(y) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            optimiser.zero_grad()
            logits = model(**_take(x, batch)).logits
            nn.functional.cross_entropy(logits, y[batch]).backward()
            optimiser.step()
            schedule.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(family: str, state: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    model = build(family)
    model.load_state_dict(dict(state))
    model.eval()
    with torch.no_grad():
        return model(**batch).logits  # type: ignore[no-any-return]


def accuracy(family: str, state: Mapping[str, Tensor], data: Digits, split: str = "test") -> float:
    y = getattr(data, f"y_{split}")
    return float((logits(family, state, inputs(family, data, split)).argmax(1) == y).float().mean())


def merge_pair(
    family: str, states: Sequence[Mapping[str, Tensor]], method: str, params: Mapping[str, Any], data: Digits
) -> MergeResult:
    return merge(states, architecture(family), {"name": method, "params": dict(params)}, calibration(family, data))


@dataclass
class PairRun:
    """One seed pair of one family: the endpoints' and every merge's held-out accuracy."""

    family: str
    seeds: tuple[int, int]
    models: list[float]  # test accuracy of model A, model B
    merged: dict[str, float] = field(default_factory=dict)  # method label -> test accuracy
    failed: dict[str, str] = field(default_factory=dict)  # method label -> the merge's error (no accuracy)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_s: float = 0.0  # both models
    merge_s: dict[str, float] = field(default_factory=dict)

    @property
    def endpoint(self) -> float:
        """Mean accuracy of the two models (the reference a merge is measured against)."""
        return statistics.fmean(self.models)

    def gap_closed(self, label: str) -> float:
        """(merged - weight_average) / (endpoint - weight_average)."""
        average = self.merged["weight_average"]
        return (self.merged[label] - average) / max(self.endpoint - average, 1e-6)


def train_pair(
    family: str, data: Digits, seeds: tuple[int, int], epochs: int = EPOCHS
) -> tuple[PairRun, list[dict[str, Tensor]]]:
    started = time.perf_counter()
    states = [train(family, data, seed=seed, epochs=epochs) for seed in seeds]
    run = PairRun(family, seeds, [accuracy(family, s, data) for s in states], train_s=time.perf_counter() - started)
    return run, states


def run_pair(
    family: str,
    data: Digits,
    seeds: tuple[int, int],
    *,
    epochs: int = EPOCHS,
    methods: Sequence[tuple[str, str, dict[str, Any]]] = METHODS,
) -> PairRun:
    """Train the pair, merge it with every method, score every merge on the test split.

    A merge the library refuses (:class:`~mudsc_core.errors.MergeError`) is recorded in ``failed``.
    """
    run, states = train_pair(family, data, seeds, epochs)
    for label, method, params in methods:
        started = time.perf_counter()
        try:
            result = merge_pair(family, states, method, params, data)
        except MergeError as exc:
            run.failed[label] = f"{type(exc).__name__}: {exc}"
            continue
        run.merge_s[label] = time.perf_counter() - started
        run.merged[label] = accuracy(family, result.state_dict, data)
        run.reports[label] = result.report
    return run
