"""Entry point of the ``t2ialign`` command.

Sub-commands follow the pipeline: world -> pretrain -> sample / eval -> generate -> label -> reward
-> finetune -> demo. A user's mistake (an unknown word, a missing file, a malformed manifest) ends
with a one-line ``error:`` message and exit code 2; set ``T2IALIGN_DEBUG=1`` for the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from t2ialign.cli import world as world_cli

EPILOG = """\
examples:
  t2ialign world showcase --out showcase.png      # look at the world
  t2ialign world prompts --suite seen --out seen.jsonl
  t2ialign world render --prompts seen.jsonl --per-prompt 4 --out renders/
  t2ialign eval --images renders/

Each sub-command has its own --help with an example.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2ialign",
        description="Align text-to-image models with human feedback, end to end.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from t2ialign import __version__

    parser.add_argument("--version", action="version", version=f"t2ialign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    world_cli.add_parsers(sub)
    for mod in _optional_modules():
        mod.add_parsers(sub)
    return parser


def _optional_modules():
    """The CLI modules of later pipeline stages (imported lazily: they pull in torch)."""
    import importlib

    names = ["models", "feedback", "reward", "finetune", "gym"]
    mods = []
    for n in names:
        try:
            mods.append(importlib.import_module(f"t2ialign.cli.{n}"))
        except ModuleNotFoundError as e:
            if e.name != f"t2ialign.cli.{n}":
                raise
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        if os.environ.get("T2IALIGN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
