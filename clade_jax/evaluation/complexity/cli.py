"""`python -m clade_jax.evaluation.complexity`: flags -> `complexity_table` -> `format_table`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax

from clade_jax.evaluation.complexity.table import complexity_table, format_table


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        default="ade20k,coco_stuff,cityscapes",
        help="comma-separated config names (clade_jax/configs) or paths",
    )
    parser.add_argument(
        "--config_arg",
        default="",
        help="config argument applied to every config, e.g. 'tiny' or 'bf16'",
    )
    parser.add_argument("--runtime", action="store_true", help="measure runtime per image")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per runtime")
    parser.add_argument(
        "--xla_compiled",
        action="store_true",
        help="XLA cost of the compiled (optimized) module, not the lowered one (slow)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated subset of the rows' model names (default: all), "
        "e.g. 'CLADE,CLADE (no inst.)'",
    )
    args = parser.parse_args(argv)
    rows = complexity_table(
        [c for c in args.configs.split(",") if c],
        runtime=args.runtime,
        batch=args.batch,
        arg=args.config_arg,
        repeats=args.repeats,
        models=[m for m in args.models.split(",") if m] or None,
        xla_compiled=args.xla_compiled,
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}")
    print(format_table(rows))
