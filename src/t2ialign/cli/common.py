"""Helpers shared by the sub-command modules."""

from __future__ import annotations

import argparse
import os


def add_command(sub, name: str, func, help: str, example: str) -> argparse.ArgumentParser:
    """Add a sub-command whose --help ends with an example."""
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def print_table(headers: list[str], rows: list[list], file=None) -> None:
    """A plain, aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=file)
        if j == 0:
            print("  ".join("-" * w for w in widths), file=file)


def add_model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """``--model``, ``--backend`` and ``--dtype``: which generator to load (``backends.load_backend``)."""
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--backend",
        default=None,
        choices=["shapes", "sd", "sdxl", "sd3", "flux"],
        help="force the model family instead of reading it from the folder",
    )
    p.add_argument("--dtype", default="float32", help="diffusers backends: float32, bf16 or fp16")


# the process-count variables of the launchers that ``accelerate launch`` drives (torchrun; mpirun for
# multi-CPU runs), as accelerate itself reads them
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started (1 when this process was started alone)."""
    for key in WORLD_SIZE_VARS:
        try:
            n = int(os.environ.get(key, ""))
        except ValueError:
            continue
        if n > 0:
            return n
    return 1


def check_device(device: str | None) -> str | None:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``; None: the command's default) if this machine has it,
    else a ValueError that says what is available."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available (torch {torch.__version__}); use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return device


def launch_accelerator(device: str | None):
    """An ``accelerate.Accelerator`` when this process is one of several started by ``accelerate
    launch`` (or torchrun / mpirun), else None (a plain single-process run). It runs on the CPU
    (``cpu=True``, a gloo group) when ``device`` asks for the CPU or CUDA is not available, else
    on this process's GPU."""
    if launched_processes() <= 1:
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        raise ValueError("a multi-process launch needs accelerate: pip install accelerate") from None
    import torch

    cpu = (device is not None and str(device).startswith("cpu")) or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)
    from t2ialign.algorithms.common import Ranks

    Ranks(accelerator)  # refuses unsupported configs (Megatron-LM, FSDP1, ZeRO-3, ...) before any model loads
    return accelerator


def finish_accelerator(accelerator) -> None:
    """Wait for every process, then leave the process group (no-op without an accelerator)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
