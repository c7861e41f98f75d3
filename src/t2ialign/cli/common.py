"""Helpers shared by the sub-command modules."""

from __future__ import annotations

import argparse


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
