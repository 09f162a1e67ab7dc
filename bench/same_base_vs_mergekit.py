"""Same-base merges against mergekit, whole process as a user runs it (imports included).

Generates three Llama-shaped float32 checkpoints of about 1 GB each (a base and two
fine-tunes = base + small deltas; the layout of ``bench/same_base_memory.py``) under
``.bench/vs_mergekit``, installs mergekit (pinned) into a throwaway virtualenv
``.bench/mergekit-venv`` (torch from pip's usual sources, i.e. the local CPU wheel), then for
task arithmetic and TIES runs, each in its own process under ``/usr/bin/time -v``:

- theirs: ``mergekit-yaml config.yml OUT`` (its defaults: CPU, no lazy unpickle);
- ours: ``python bench/same_base_vs_mergekit.py --ours config.yml OUT``, which translates the same
  YAML (``mudsc_core.schema.mergekit.from_mergekit``) and calls ``mudsc_core.files.merge_files``,
  what the worker calls.

Each pair is run ``--repeats`` times, alternating which side goes first; before every run the
previous output is deleted and ``sync`` flushes dirty pages, so that no run pays for writing back
the other's 1 GB output (the side that always ran second used to). The medians of wall time and
peak RSS are compared (CPU time, user + system, is printed beside them: on a shared machine it moves less with the
load than wall time). Targets: ours at least 3x faster (wall) and at most 1/3 of mergekit's peak RSS. The two
outputs are compared tensor by tensor (max abs difference) once per method.

    python -m bench same_base_vs_mergekit        # or: python bench/same_base_vs_mergekit.py [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".bench" / "vs_mergekit"
VENV = ROOT / ".bench" / "mergekit-venv"
MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
URI = {name: f"s3://bench/{name}/" for name in ("base", "ft_a", "ft_b")}
CONFIGS = {
    "task_arithmetic": {"models": {"weight": 1.0}, "parameters": {}},
    "ties": {"models": {"weight": 1.0, "density": 0.2}, "parameters": {}},
}
SPEED_TARGET, MEMORY_TARGET = 3.0, 1 / 3


def ours(config_path: Path, out: Path) -> None:
    """Our side, as a user's script would do it: the mergekit YAML in, a merged folder out."""
    import yaml

    from mudsc_core.files import LocalInputs, merge_files
    from mudsc_core.schema.mergekit import from_mergekit

    config = yaml.safe_load(config_path.read_text())
    local = {URI[name]: WORK / name for name in URI}
    for entry in config["models"]:
        entry["model"] = next(uri for uri, path in local.items() if str(path) == entry["model"])
    config["base_model"] = next(uri for uri, path in local.items() if str(path) == config["base_model"])
    spec = from_mergekit(config)
    inputs = LocalInputs(models=[local[m.uri] for m in spec.models], base_model=local[spec.base_model.uri])
    merge_files(spec, inputs, out, device="cpu")


def ensure_mergekit() -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", TORCH, MERGEKIT], check=True)
    return exe


def generate() -> list[Path]:
    import torch

    from bench.same_base_memory import LLAMA, llama_layout
    from mudsc_core.io import ShardWriter

    layout = llama_layout(LLAMA)
    folders = [WORK / name for name in ("base", "ft_a", "ft_b")]
    if all((f / "config.json").exists() for f in folders):
        return folders
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
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **LLAMA,
    }
    for folder, writer in zip(folders, writers):
        writer.close()
        (folder / "config.json").write_text(json.dumps(config))
    return folders


def write_config(method: str) -> Path:
    cfg = CONFIGS[method]
    lines = [f"merge_method: {method}", f"base_model: {WORK / 'base'}", "dtype: float32", "models:"]
    for name in ("ft_a", "ft_b"):
        lines += [f"  - model: {WORK / name}", f"    parameters: {json.dumps(cfg['models'])}"]
    if cfg["parameters"]:
        lines.append(f"parameters: {json.dumps(cfg['parameters'])}")
    path = WORK / f"{method}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GB) and CPU seconds (user + system) of one process, from /usr/bin/time -v."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *argv], cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed: {' '.join(argv)}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    cpu = sum(
        float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System")
    )
    return wall, rss_kb / 1024**2, cpu


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out: dict = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return float("inf")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", nargs=2, type=Path, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    if args.ours:
        sys.path.insert(0, str(ROOT))
        ours(*args.ours)
        return 0

    sys.path.insert(0, str(ROOT))
    mergekit = ensure_mergekit()
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folders = generate()
    sizes = [sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9 for folder in folders]
    load = os.getloadavg()
    lines = [
        f"same-base: ours (merge_files) vs {MERGEKIT} (mergekit-yaml), whole processes, {args.repeats} runs each, medians",
        f"checkpoints: base + 2 fine-tunes, Llama-shaped, float32, {', '.join(f'{s:.2f} GB' for s in sizes)} "
        f"(ready in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPUs, load average at start "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
        "",
        f"{'method':<16}{'mergekit s':>11}{'ours s':>8}{'speed-up':>9}{'mergekit GB':>12}{'ours GB':>8}"
        f"{'RSS ratio':>10}{'CPU s (theirs/ours)':>21}{'CPU ratio':>10}{'max |diff|':>11}  runs (wall s / GB / CPU s)",
    ]
    print("\n".join(lines), flush=True)
    passed = True
    for method in args.methods:
        config = write_config(method)
        theirs_out, ours_out = WORK / f"out_mergekit_{method}", WORK / f"out_ours_{method}"
        runs: dict[str, list[tuple[float, float, float]]] = {"mergekit": [], "ours": []}
        for repeat in range(args.repeats):
            for side in ("mergekit", "ours") if repeat % 2 == 0 else ("ours", "mergekit"):
                out = theirs_out if side == "mergekit" else ours_out
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # start from clean page cache state: no write-back of the last run's output
                argv = (
                    [str(mergekit), str(config), str(out)]
                    if side == "mergekit"
                    else [sys.executable, str(Path(__file__).resolve()), "--ours", str(config), str(out)]
                )
                runs[side].append(timed(argv))
        diff = max_diff(ours_out, theirs_out)
        med = {side: tuple(statistics.median(run[k] for run in r) for k in range(3)) for side, r in runs.items()}
        speed = med["mergekit"][0] / med["ours"][0]
        memory = med["ours"][1] / med["mergekit"][1]
        ok = speed >= SPEED_TARGET and memory <= MEMORY_TARGET
        passed &= ok
        detail = "; ".join(
            f"{side} " + ", ".join(f"{w:.1f}/{m:.2f}/{c:.1f}" for w, m, c in r) for side, r in runs.items()
        )
        cpu = f"{med['mergekit'][2]:.1f}/{med['ours'][2]:.1f}"
        line = (
            f"{method:<16}{med['mergekit'][0]:>11.1f}{med['ours'][0]:>8.1f}{speed:>8.1f}x{med['mergekit'][1]:>12.2f}"
            f"{med['ours'][1]:>8.2f}{memory:>10.3f}{cpu:>21}{med['mergekit'][2] / med['ours'][2]:>9.1f}x{diff:>11.2e}"
            f"  {detail}"
        )
        lines.append(line)
        print(line, flush=True)
        for out in (theirs_out, ours_out):
            shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    tail = [
        "",
        f"targets: speed-up >= {SPEED_TARGET:.0f}x and RSS ratio <= {MEMORY_TARGET:.3f}: {'PASS' if passed else 'FAIL'}; "
        f"load average at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
    ]
    lines += tail
    print("\n".join(tail), flush=True)
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
