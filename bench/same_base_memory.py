"""Peak RSS and wall time of the streaming same-base merge against a naive load-everything one.

Generates three Llama-shaped checkpoints of about 1 GB each (float32 random weights: a base
and two fine-tunes = base + small deltas, HF folders with shards) under ``.bench/``, then
runs ``task_arithmetic`` and ``ties`` both ways, each run in its own subprocess so that its
peak RSS (``ru_maxrss``) is its own. The naive run loads every model whole
(``safetensors.torch.load_file``), merges each tensor with the same tensor functions and
saves the whole result with ``save_file``; wall time is measured inside each subprocess
from the first read to the last byte written (interpreter and torch import excluded).

Targets: streaming peak RSS < 1/3 of naive, wall time no worse (ratio <= ~1).

    python bench/same_base_memory.py            # generate, run, print, delete .bench/same_base
    python bench/same_base_memory.py --keep     # keep the generated checkpoints
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
WORK = ROOT / ".bench" / "same_base"
METHODS = {"task_arithmetic": {}, "ties": {"density": 0.2}}
LLAMA = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 15}
if os.environ.get("MUDSC_BENCH_SMOKE"):  # a tiny run that checks the script, not the targets
    LLAMA = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def llama_layout(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        names += [
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    return names + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def generate() -> list[Path]:
    import torch

    from mudsc_core.io import ShardWriter

    layout = llama_layout(LLAMA)
    folders = [WORK / name for name in ("base", "ft_a", "ft_b")]
    writers = [
        ShardWriter(f, "float32", 400 * 1024**2, layout=[(n, torch.float32, s) for n, s in layout]) for f in folders
    ]
    g = torch.Generator().manual_seed(0)
    for name, shape in layout:
        base = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g).mul_(0.02)
        writers[0].add(name, base)
        for writer in writers[1:]:
            writer.add(name, base + torch.randn(shape, generator=g).mul_(0.002))
        del base
    for folder, writer in zip(folders, writers):
        writer.close()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA}))
    return folders


# --------------------------------------------------------------------------- the two runs (child processes)
def run_streaming(method: str, out: Path) -> dict:
    from mudsc_core.same_base.stream import merge_checkpoints

    started = time.perf_counter()
    report = merge_checkpoints(
        method,
        METHODS[method],
        [WORK / "ft_a", WORK / "ft_b"],
        WORK / "base",
        [1.0, 1.0],
        out,
        dtype="float32",
        shard_size_bytes=2 * 1024**3,
    )
    return {"wall_s": time.perf_counter() - started, "metrics": report["metrics"]}


def run_naive(method: str, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from mudsc_core.same_base.task_arithmetic import task_arithmetic
    from mudsc_core.schema.methods import METHODS as REGISTRY

    params = REGISTRY[method].params.model_validate(METHODS[method]).to_gta()
    started = time.perf_counter()
    states = []
    for folder in (WORK / "base", WORK / "ft_a", WORK / "ft_b"):
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            state.update(load_file(shard))
        states.append(state)
    base, models = states[0], states[1:]
    merged = {
        name: task_arithmetic(base[name], [m[name] for m in models], [1.0, 1.0], params, name=name) for name in base
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
    return {"wall_s": time.perf_counter() - started}


def child(kind: str, method: str) -> None:
    out = WORK / f"out_{kind}_{method}"
    result = (run_streaming if kind == "streaming" else run_naive)(method, out)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        folders = generate()
        sizes = [sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9 for folder in folders]
        largest = max(s for _, s in llama_layout(LLAMA))
        lines = [
            f"same-base streaming vs naive (torch {torch.__version__}, {torch.get_num_threads()} threads)",
            f"checkpoints: base + 2 fine-tunes, Llama-shaped {LLAMA}, float32, "
            f"{', '.join(f'{s:.2f} GB' for s in sizes)} (generated in {time.perf_counter() - t0:.0f} s); "
            f"largest tensor {largest[0]}x{largest[1]} = {largest[0] * largest[1] * 4 / 1e6:.0f} MB",
            "",
            f"{'method':<16}{'run':<11}{'wall s':>9}{'peak RSS MB':>13}",
        ]
        results: dict[tuple[str, str], dict] = {}
        for method in METHODS:
            for kind in ("naive", "streaming"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", kind, method],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[(method, kind)] = json.loads(proc.stdout.strip().splitlines()[-1])
                r = results[(method, kind)]
                lines.append(f"{method:<16}{kind:<11}{r['wall_s']:>9.1f}{r['peak_rss_mb']:>13.0f}")
        lines.append("")
        for method in METHODS:
            naive, stream = results[(method, "naive")], results[(method, "streaming")]
            rss_ratio = stream["peak_rss_mb"] / naive["peak_rss_mb"]
            time_ratio = stream["wall_s"] / naive["wall_s"]
            metrics = ", ".join(f"{k}={v:.1f}" for k, v in stream["metrics"].items())
            lines.append(
                f"{method}: peak RSS ratio {rss_ratio:.3f} (target < 0.333: "
                f"{'PASS' if rss_ratio < 1 / 3 else 'FAIL'}), wall time ratio {time_ratio:.2f} "
                f"(target <= 1: {'PASS' if time_ratio <= 1.0 else 'FAIL'}); streaming split: {metrics}"
            )
        print("\n".join(lines))
    finally:
        if not args.keep:
            shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
