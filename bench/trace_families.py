"""Trace time and self-check time of the derived spec, per Hugging Face family (docs/tracing.md).

Every model is a small random-init config built from its transformers config class (never downloaded),
the same models ``tests/unit/test_trace_families.py`` checks. Weights are perturbed after construction
(biases, norm affines, BatchNorm statistics and ConvNeXt's layer scale are constants at init, and a wrong
permutation of a constant goes unseen). For each model: parameters, free groups, the time of
``trace_spec`` (capture + walk + assembly) and the part of it spent capturing (torch.export), and
of ``self_check`` (two random permutations, float32), medians of ``--repeats`` runs after one warm-up
trace; the baseline is one forward pass of the same model on the same inputs (median of 10), and the
table gives the trace time as a multiple of it. Prints a markdown table.

    python -m bench.trace_families [--repeats 5] [--width 32] [--layers 2] [--only CLASS ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mudsc_core.permutation.trace import TraceResult, self_check, trace_spec

VOCAB, TOKENS, BATCH, IMAGE = 50, 8, 2, 32
# The tests' size: width 32 (4 heads of 8; 2 kv heads), MLP 64, 2 layers (ConvNeXt / ResNet: 2 + 1 blocks)
HIDDEN, HEADS, INNER, LAYERS = 32, 4, 64, 2

Config = dict[str, Any]


def _heads(width: int) -> int:
    return max(HEADS, width // 64)


def _bert_like(width: int, layers: int) -> Config:
    return {
        "vocab_size": VOCAB,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": _heads(width),
        "intermediate_size": 2 * width,
        "max_position_embeddings": 32,
        "num_labels": 3,
        "pad_token_id": 1,
    }


def _distilbert(width: int, layers: int) -> Config:
    return {
        "vocab_size": VOCAB,
        "dim": width,
        "n_layers": layers,
        "n_heads": _heads(width),
        "hidden_dim": 2 * width,
        "max_position_embeddings": 32,
        "num_labels": 3,
    }


def _decoder(tied: bool) -> Callable[[int, int], Config]:
    def config(width: int, layers: int) -> Config:  # grouped-query attention: two q heads per kv head
        return {
            "vocab_size": VOCAB,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": layers,
            "num_attention_heads": _heads(width),
            "num_key_value_heads": _heads(width) // 2,
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "tie_word_embeddings": tied,
        }

    return config


def _vision(width: int, layers: int) -> Config:  # 32 px, 8 px patches: 16 patches and a class token
    return {
        "image_size": IMAGE,
        "patch_size": 8,
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": _heads(width),
        "intermediate_size": 2 * width,
        "num_labels": 3,
        "projection_dim": 24,
    }


def _convnext(width: int, layers: int) -> Config:
    # layer scale 1 instead of 1e-6: a block's contribution (and so a wrong permutation of it) must show
    return {
        "num_channels": 3,
        "hidden_sizes": [width, 2 * width],
        "depths": [layers, 1],
        "num_stages": 2,
        "layer_scale_init_value": 1.0,
        "num_labels": 3,
    }


def _resnet(layer_type: str) -> Callable[[int, int], Config]:
    def config(width: int, layers: int) -> Config:
        return {
            "num_channels": 3,
            "embedding_size": width,
            "hidden_sizes": [width, 2 * width],
            "depths": [layers, 1],
            "layer_type": layer_type,
            "num_labels": 3,
        }

    return config


@dataclass(frozen=True)
class Family:
    """One model class of a family; ``config(width, layers)`` its config; ``inputs`` is ``"text"`` or ``"image"``."""

    family: str
    cls: str
    config_cls: str
    inputs: str
    config: Callable[[int, int], Config]

    def build(self, seed: int = 0, width: int = HIDDEN, layers: int = LAYERS, **overrides: Any) -> nn.Module:
        """The model with perturbed random weights; ``overrides`` replace config entries."""
        import transformers

        torch.manual_seed(seed)
        config = getattr(transformers, self.config_cls)(**{**self.config(width, layers), **overrides})
        model = getattr(transformers, self.cls)(config).eval()
        perturb(model, seed)
        return model  # type: ignore[no-any-return]

    def example_inputs(self) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(1)
        if self.inputs == "image":
            return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=generator)}
        input_ids = torch.randint(2, VOCAB, (BATCH, TOKENS), generator=generator)
        attention_mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
        attention_mask[1, -2:] = 0  # one padded sample: masks are traced as calibration passes them
        return {"input_ids": input_ids, "attention_mask": attention_mask}


FAMILIES: tuple[Family, ...] = (
    Family("roberta", "RobertaModel", "RobertaConfig", "text", _bert_like),
    Family("roberta", "RobertaForSequenceClassification", "RobertaConfig", "text", _bert_like),
    Family("roberta", "RobertaForMaskedLM", "RobertaConfig", "text", _bert_like),
    Family("distilbert", "DistilBertModel", "DistilBertConfig", "text", _distilbert),
    Family("distilbert", "DistilBertForSequenceClassification", "DistilBertConfig", "text", _distilbert),
    Family("distilbert", "DistilBertForMaskedLM", "DistilBertConfig", "text", _distilbert),
    Family("mistral", "MistralForCausalLM", "MistralConfig", "text", _decoder(tied=False)),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "text", _decoder(tied=True)),
    Family("vit", "ViTModel", "ViTConfig", "image", _vision),
    Family("vit", "ViTForImageClassification", "ViTConfig", "image", _vision),
    Family("clip vision", "CLIPVisionModel", "CLIPVisionConfig", "image", _vision),
    Family("clip vision", "CLIPVisionModelWithProjection", "CLIPVisionConfig", "image", _vision),
    Family("convnext", "ConvNextModel", "ConvNextConfig", "image", _convnext),
    Family("convnext", "ConvNextForImageClassification", "ConvNextConfig", "image", _convnext),
    Family("resnet", "ResNetModel", "ResNetConfig", "image", _resnet("basic")),
    Family("resnet", "ResNetForImageClassification", "ResNetConfig", "image", _resnet("bottleneck")),
)


def family(cls: str) -> Family:
    """The entry of ``FAMILIES`` for a model class name."""
    return next(f for f in FAMILIES if f.cls == cls)


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """Make every floating state entry vary: HF init leaves biases at 0, norm affines at 1/0, BN stats at 0/1."""
    generator = torch.Generator().manual_seed(seed + 100)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not torch.is_floating_point(tensor):
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        else:
            tensor.add_(0.05 * noise)


@dataclass(frozen=True)
class Row:
    family: str
    cls: str
    params: int
    free_groups: int
    trace_s: float
    capture_s: float
    check_s: float
    forward_s: float
    error: float


def measure(entry: Family, repeats: int = 3, width: int = HIDDEN, layers: int = LAYERS) -> Row:
    model = entry.build(width=width, layers=layers)
    inputs = entry.example_inputs()
    traces, captures, checks = [], [], []
    result: TraceResult | None = None
    error = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        result = trace_spec(model, inputs)
        traces.append(time.perf_counter() - start)
        captures.append(result.capture_seconds)
        start = time.perf_counter()
        error = self_check(model, result.spec, inputs)
        checks.append(time.perf_counter() - start)
    assert result is not None
    forwards = []
    with torch.no_grad():
        for _ in range(10):
            start = time.perf_counter()
            model(**inputs)
            forwards.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return Row(
        entry.family,
        entry.cls,
        params,
        len(result.spec.groups),
        statistics.median(traces),
        statistics.median(captures),
        statistics.median(checks),
        statistics.median(forwards),
        error,
    )


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| family | class | params | free groups | trace s | of which capture s | check s | trace / forward "
        "| check error |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.family} | `{r.cls}` | {r.params:,} | {r.free_groups} | {r.trace_s:.2f} | {r.capture_s:.2f} | {r.check_s:.3f} "
            f"| {r.trace_s / r.forward_s:,.0f} | {r.error:.0e} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=HIDDEN, help="hidden size (conv nets: first stage's channels)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers (conv nets: blocks of the first stage)")
    parser.add_argument("--only", nargs="*", default=None, help="model classes to measure (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    entries = [f for f in FAMILIES if args.only is None or f.cls in args.only]
    torch.set_num_threads(1)
    measure(FAMILIES[0], repeats=1)  # warm-up: torch.export's first capture also imports and compiles
    rows = [measure(entry, args.repeats, args.width, args.layers) for entry in entries]
    lines = [
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, one CPU thread, "
        f"width {args.width}, {args.layers} layers, median of {args.repeats}",
        "",
        *table(rows),
    ]
    print("\n".join(lines), flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
