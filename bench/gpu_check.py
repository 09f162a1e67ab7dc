"""The core on CUDA against the CPU: same results within tolerance, CPU vs GPU time, peak GPU memory.

    python -m bench gpu_check                  # on a CUDA machine, at most ~5 minutes
    python -m bench.gpu_check --cpu-only       # no GPU: both sides on the CPU, small models (checks the script)

Cases (each merged once on the CPU and once on ``cuda``, from the same inputs):

- ``resnet20x8``: MuDSC zip (beta 0.5) of two ResNet-20x8 (built-in ``resnet``, random init), 256
  calibration images;
- ``vit``: MuDSC align (beta 0.5) of two ViTs (built-in ``vit``: embed 384, depth 6, 6 heads);
- ``bert_base``: MuDSC align (beta 0.5) of two traced BERT-base-size ``BertForSequenceClassification``
  (``{"name": "transformers", "config": BertConfig(...).to_dict()}``), keyword calibration
  (``input_ids``, ``attention_mask`` with padding);
- ``ties_1gb``: TIES (density 0.2) of two ~1 GB Llama-shaped fine-tunes of one base: the core's tensor
  function (``task_arithmetic`` with TIES params) tensor by tensor, on the CPU and on the GPU.

Agreement: the merged tensors (``max |gpu - cpu|`` against ``atol + rtol * max |cpu|`` per tensor) and,
for the permutation merges, the merged models' outputs on a held-out batch. TF32 is switched off so
both sides compute in float32. Without a CUDA device (and without ``--cpu-only``) it prints
"no CUDA device" and exits 0. ``--cpu-only`` runs every case on the CPU twice (the second run stands in
for the GPU one), with small models unless ``--full``; ``--small`` shrinks the models on a GPU too.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-3, 1e-4  # float32 reductions in another order (cuBLAS, cuDNN) vs MKL / oneDNN
OUTPUT_RTOL = 1e-2  # merged models' outputs: relative to the largest |output|


@dataclass
class Case:
    name: str
    run: Callable[[str], Mapping[str, Any]]  # device -> merged tensors (and "outputs")
    note: str


def _build(architecture: Mapping[str, Any]) -> Any:
    """A randomly initialised model: built-in architectures by the core, transformers ones by their class
    (the core builds those for tracing and loading, without initialising their weights)."""
    from mudsc_core import build_model

    if architecture["name"] == "transformers":
        import transformers

        config = transformers.AutoConfig.for_model(**architecture["config"])
        return getattr(transformers, config.architectures[0])(config)
    return build_model(architecture)


def _seeded(architecture: Mapping[str, Any], seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in _build(architecture).state_dict().items()}


def _outputs(architecture: Mapping[str, Any], state: Mapping[str, Any], batch: Any) -> Any:
    import torch

    model = _build(architecture)
    model.load_state_dict({k: v.cpu() for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    return getattr(out, "logits", out)


def permutation_case(
    name: str, architecture: dict[str, Any], method: dict[str, Any], calibration: Any, held_out: Any
) -> Case:
    from mudsc_core.permutation.merge import merge

    states = [_seeded(architecture, seed) for seed in (1, 2)]

    def run(device: str) -> Mapping[str, Any]:
        result = merge(states, architecture, method, calibration, device=device)
        merged = {k: v.detach().cpu() for k, v in result.state_dict.items()}
        return {**merged, "outputs": _outputs(architecture, merged, held_out)}

    return Case(name, run, f"{method['params']}")


def resnet_case(small: bool) -> Case:
    import torch

    arch = {"name": "resnet", "config": {"depth": 8 if small else 20, "width": 1 if small else 8, "num_classes": 10}}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(32 if small else 256, 3, 32, 32, generator=g)
    return permutation_case(
        "resnet8x1" if small else "resnet20x8",
        arch,
        {"name": "mudsc", "params": {"mode": "zip", "beta": 0.5}},
        images,
        torch.randn(16, 3, 32, 32, generator=g),
    )


def vit_case(small: bool) -> Case:
    import torch

    config = {"image_size": 32, "patch_size": 4, "embed_dim": 32 if small else 384, "depth": 2 if small else 6}
    config["num_heads"] = 4 if small else 6
    g = torch.Generator().manual_seed(0)
    return permutation_case(
        "vit_small" if small else "vit",
        {"name": "vit", "config": config},
        {"name": "mudsc", "params": {"mode": "align", "beta": 0.5}},
        torch.randn(32 if small else 128, 3, 32, 32, generator=g),
        torch.randn(16, 3, 32, 32, generator=g),
    )


def bert_case(small: bool) -> Case:
    import torch
    import transformers

    size = (
        {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
        if small
        else {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    )
    vocab = 1000 if small else 30522
    config = transformers.BertConfig(
        vocab_size=vocab,
        max_position_embeddings=64,
        num_labels=2,
        architectures=["BertForSequenceClassification"],
        **size,
    )
    g = torch.Generator().manual_seed(0)

    def batch(samples: int, tokens: int = 32) -> dict[str, Any]:
        lengths = torch.randint(tokens // 2, tokens + 1, (samples,), generator=g)
        mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
        return {"input_ids": torch.randint(0, vocab, (samples, tokens), generator=g), "attention_mask": mask}

    return permutation_case(
        "bert_tiny" if small else "bert_base",
        {"name": "transformers", "config": config.to_dict()},
        {"name": "mudsc", "params": {"mode": "align", "beta": 0.5}},
        batch(16 if small else 64),
        batch(8),
    )


def ties_case(small: bool) -> Case:
    import torch

    from bench.same_base_memory import LLAMA, llama_layout
    from mudsc_core.same_base.task_arithmetic import task_arithmetic
    from mudsc_core.schema.methods import METHODS

    cfg = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2} if small else LLAMA
    layout = llama_layout(cfg)
    params = METHODS["ties"].params.model_validate({"density": 0.2}).to_gta()
    g = torch.Generator().manual_seed(0)
    base: dict[str, Any] = {}
    models: list[dict[str, Any]] = [{}, {}]
    for name, shape in layout:
        base[name] = torch.randn(shape, generator=g).mul_(0.02)
        for model in models:
            model[name] = base[name] + torch.randn(shape, generator=g).mul_(0.002)

    def run(device: str) -> Mapping[str, Any]:
        merged = {}
        for name, _ in layout:
            inputs = [base[name].to(device)] + [m[name].to(device) for m in models]
            merged[name] = task_arithmetic(inputs[0], inputs[1:], [1.0, 1.0], params, name=name).cpu()
            del inputs
        return merged

    gb = sum(t.numel() for t in base.values()) * 4 / 1e9
    return Case("ties_1gb" if not small else "ties_small", run, f"density 0.2, 3 x {gb:.2f} GB float32")


def _compare(cpu: Mapping[str, Any], gpu: Mapping[str, Any]) -> tuple[bool, str]:
    if set(cpu) != set(gpu):
        return False, f"different tensors: {sorted(set(cpu) ^ set(gpu))[:5]}"
    worst, worst_name, failures = 0.0, "", []
    for name, expected in cpu.items():
        got = gpu[name]
        if not expected.is_floating_point():
            if not bool((expected == got).all()):
                failures.append(name)
            continue
        diff = float((got.float() - expected.float()).abs().max()) if expected.numel() else 0.0
        scale = float(expected.float().abs().max()) if expected.numel() else 0.0
        limit = (OUTPUT_RTOL * scale) if name == "outputs" else (ATOL + RTOL * scale)
        relative = diff / limit if limit > 0 else (0.0 if diff == 0 else float("inf"))
        if relative > worst:
            worst, worst_name = relative, name
        if diff > limit:
            failures.append(name)
    summary = f"worst {worst_name or '-'} at {worst:.2f} of its tolerance"
    if failures:
        return False, f"{len(failures)} of {len(cpu)} tensors out of tolerance ({', '.join(failures[:3])}); {summary}"
    return True, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-only", action="store_true", help="no GPU: run both sides on the CPU")
    parser.add_argument("--small", action="store_true", help="small models (the default with --cpu-only)")
    parser.add_argument("--full", action="store_true", help="with --cpu-only: the full-size models")
    parser.add_argument("--cases", nargs="+", choices=["resnet", "vit", "bert", "ties"], default=None)
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.cpu_only and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (python -m bench.gpu_check --cpu-only runs the same code on the CPU)")
        return 0
    device = "cpu" if args.cpu_only else "cuda"
    small = args.small or (args.cpu_only and not args.full)
    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    cuda_name = torch.cuda.get_device_name(0) if device == "cuda" else "none (--cpu-only: CPU vs CPU)"
    lines = [
        f"gpu_check: device {cuda_name}; torch {torch.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        f"tolerance per tensor |gpu - cpu| <= {ATOL:g} + {RTOL:g} * max|cpu|; merged outputs <= {OUTPUT_RTOL:g} * max|cpu|",
        "",
        f"{'case':<12}{'cpu s':>8}{'gpu s':>8}{'speed-up':>9}{'peak GPU MB':>12}  agreement",
    ]
    print("\n".join(lines), flush=True)
    builders = {"resnet": resnet_case, "vit": vit_case, "bert": bert_case, "ties": ties_case}
    passed = True
    for key in args.cases or list(builders):
        case = builders[key](small)
        t0 = time.perf_counter()
        cpu = case.run("cpu")
        cpu_s = time.perf_counter() - t0
        if device == "cuda":
            case.run("cuda")  # warm-up: CUDA context, kernels, cuDNN autotuning
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        gpu = case.run(device)
        if device == "cuda":
            torch.cuda.synchronize()
        gpu_s = time.perf_counter() - t0
        peak = f"{torch.cuda.max_memory_allocated() / 1024**2:.0f}" if device == "cuda" else "-"
        ok, agreement = _compare(cpu, gpu)
        passed &= ok
        line = (
            f"{case.name:<12}{cpu_s:>8.1f}{gpu_s:>8.1f}{cpu_s / gpu_s:>8.1f}x{peak:>12}  "
            f"{'OK' if ok else 'MISMATCH'}: {agreement} ({case.note})"
        )
        lines.append(line)
        print(line, flush=True)
        del cpu, gpu
    tail = f"\n{'PASS' if passed else 'FAIL'}: GPU results {'equal' if passed else 'differ from'} the CPU's"
    lines.append(tail)
    print(tail, flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
