"""Wall time of the main job: ``t2ialign demo --quick`` (target 3 minutes) and ``t2ialign demo``
(target 15 minutes) on this machine, each in a fresh output folder.

    python benchmarks/demo_time.py --quick --full --json /tmp/demo_time.json

Prints the wall time, the demo's own per-stage times and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(quick: bool, workdir: Path) -> dict:
    out = workdir / ("demo-quick" if quick else "demo-full")
    cmd = [sys.executable, "-m", "t2ialign", "demo", "--out", str(out)] + (["--quick"] if quick else [])
    load0 = os.getloadavg()
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    res = json.loads((out / "results.json").read_text())
    return {
        "command": " ".join(["t2ialign", *cmd[3:]]),
        "wall_s": round(wall, 1),
        "load_before": load0,
        "load_after": os.getloadavg(),
        "stage_seconds": res["stage_seconds"],
        "seen_before": res["before"]["seen"]["overall"],
        "seen_after": res["after"]["seen"]["overall"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="time demo --quick")
    ap.add_argument("--full", action="store_true", help="time the default demo")
    ap.add_argument("--workdir", default=None, help="where the demo folders go (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not (args.quick or args.full):
        ap.error("choose --quick and/or --full")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="demo_time_"))
    results = {}
    for name, quick in (("quick", True), ("full", False)):
        if getattr(args, name):
            results[name] = run(quick, workdir)
            print(name, json.dumps(results[name]))
    results["cpus"] = os.cpu_count()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
