"""Peak memory of each trainer with and without gradient accumulation, on a tiny SD3 pipeline.

For each method, two runs of ``benchmarks/accelerate_train.py --model TINY_SD3`` in fresh processes,
each an optimiser step's batch of ``--batch`` samples: once in one pass (K = 1), once in
``--accumulation`` micro-batches (K = 4 by default: batch B against B / 4 with 4 accumulation steps).
The figure is the peak of the activations held for the backward pass (the bytes of the distinct
storages that autograd saves, counted through ``torch.autograd.graph.saved_tensors_hooks``, weights
left out): what accumulation divides, on any device. Beside it, the rise of the process's peak
resident memory over training (Linux's VmHWM, reset after the model loads), which on a model this
small is mostly the optimiser's state and the allocator's caching, not activations.

    OMP_NUM_THREADS=1 python benchmarks/accumulation_memory.py --out runs/accmem --json runs/accmem.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

METHODS = ("rwr", "dpo", "grpo", "ddpo", "nft", "raft", "refl")

CHILD = r"""
import json, sys, weakref
import torch
sys.path.insert(0, {bench!r})
import accelerate_train
import t2ialign.cli.finetune as finetune

def status():
    rows = [x.split() for x in open("/proc/self/status") if x.startswith("Vm")]
    return {{r[0].rstrip(":"): int(r[1]) for r in rows}}

live = {{"bytes": 0, "peak": 0}}
refs = {{}}

class Held:
    def __init__(self, t):
        self.t = t

def pack(t):
    base = t._base if t._base is not None else t
    if isinstance(base, torch.nn.Parameter):  # weights are held anyway
        return t
    storage = t.untyped_storage()
    key = storage.data_ptr()
    if key not in refs:
        refs[key] = [0, storage.nbytes()]
        live["bytes"] += storage.nbytes()
        live["peak"] = max(live["peak"], live["bytes"])
    refs[key][0] += 1
    held = Held(t)
    weakref.finalize(held, release, key)
    return held

def release(key):
    refs[key][0] -= 1
    if refs[key][0] == 0:
        live["bytes"] -= refs.pop(key)[1]

def unpack(h):
    return h.t if isinstance(h, Held) else h

seen = {{}}
inner = finetune.train_method

def measured(*a, **k):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
    seen["start_kb"] = status()["VmRSS"]
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        rows = inner(*a, **k)
    seen["peak_kb"] = status()["VmHWM"]
    seen["activations_peak"] = live["peak"]
    return rows

finetune.train_method = measured
accelerate_train.main({args!r})
print("MEMORY " + json.dumps(seen), flush=True)
"""


def method_args(method: str, batch: int) -> list[str]:
    """The script's flags for one optimiser step of ``batch`` samples (a group size of 8)."""
    groups = ["--prompts-per-iter", str(batch // 8), "--group-size", "8"]
    return {
        "rwr": ["--batch-size", str(batch), "--data", str(batch)],
        "dpo": ["--batch-size", str(batch), "--data", str(batch)],
        "grpo": [*groups, "--minibatch-size", str(batch)],
        "ddpo": ["--batch-size", str(batch), "--minibatch-size", str(batch)],
        "nft": [*groups, "--minibatch-size", str(batch)],
        "raft": [*groups, "--batch-size", str(batch), "--steps-per-round", "1"],
        "refl": ["--batch-size", str(batch)],
    }[method]


def measure(model: Path, method: str, batch: int, k: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
    args = ["--method", method, "--model", str(model), "--no-accelerator", "--iterations", "1"]
    args += ["--train-steps", "2", "--gradient-accumulation-steps", str(k), "--out", str(out)]
    args += method_args(method, batch)
    code = CHILD.format(bench=str(ROOT / "benchmarks"), args=args)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise RuntimeError(f"{method} K={k} failed:\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("MEMORY "))
    mem = json.loads(line[len("MEMORY ") :])
    return {
        "method": method,
        "batch": batch,
        "accumulation": k,
        "activations_mb": mem["activations_peak"] / 2**20,
        "rss_increase_mb": (mem["peak_kb"] - mem["start_kb"]) / 1024,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a folder for the tiny pipeline and the runs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=32, help="samples per optimiser step (a multiple of 8)")
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers_helpers import build_pipeline  # tiny random models from config, as the tests

    model = out / "tiny-sd3"
    if not (model / "model_index.json").exists():
        build_pipeline("sd3", model)
    rows = []
    for method in args.methods.split(","):
        pair = [measure(model, method, args.batch, k, out / f"{method}-k{k}") for k in (1, args.accumulation)]
        pair[1]["ratio"] = pair[1]["activations_mb"] / max(pair[0]["activations_mb"], 1e-9)
        rows += pair
        print(
            f"{method:5s} batch {args.batch}: activations K=1 {pair[0]['activations_mb']:8.2f} MB, "
            f"K={args.accumulation} {pair[1]['activations_mb']:8.2f} MB ({pair[1]['ratio']:.2f}x); "
            f"resident increase {pair[0]['rss_increase_mb']:.0f} -> {pair[1]['rss_increase_mb']:.0f} MB",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
