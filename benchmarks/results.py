"""benchmarks/RESULTS.md, where the benchmark scripts record their dated blocks.

The scripts run as `python benchmarks/<name>.py`, so this sibling module imports as `results`.
"""

from __future__ import annotations

import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def report(block: str, *, append: bool = True) -> None:
    """Prints `block` and, with `append`, adds it to RESULTS.md after a blank line."""
    print(block)
    if append:
        with open(PATH, "a") as f:
            f.write("\n" + block)
