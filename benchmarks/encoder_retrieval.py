"""Zero-shot prompt retrieval of the shipped image-text encoder, per attribute, re-measured here.

``t2ialign pretrain-encoder`` measures this at the end of training (on the machine that trained it)
and stores it in the encoder's ``card.json``; this script repeats the measurement with
:func:`t2ialign.models.encoder.zero_shot_retrieval` (the same held-out data seed) on this machine,
and prints it beside the card's figures.

::

    python benchmarks/encoder_retrieval.py --n 1000 --json encoder_retrieval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from t2ialign.models.encoder import default_encoder_path, load_encoder, zero_shot_retrieval


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="held-out renders")
    ap.add_argument("--model", default=None, help="encoder folder (default: the shipped one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folder = args.model or default_encoder_path()
    card = json.loads((Path(folder) / "card.json").read_text())
    t0 = time.perf_counter()
    res = zero_shot_retrieval(load_encoder(args.model), n=args.n)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    at_training = card.get("zero_shot_retrieval", {})
    print(f"zero-shot retrieval on {res['n']} held-out renders: overall {res['overall']:.3f}", end="")
    print(f" (card: {at_training['overall']:.3f})" if at_training else "")
    for a, v in res["per_attribute"].items():
        old = at_training.get("per_attribute", {}).get(a)
        print(
            f"  {a:<11} {v['accuracy']:.3f}  n={v['n']}" + (f"  (card: {old['accuracy']:.3f})" if old else "")
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"measured": res, "card": at_training}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
