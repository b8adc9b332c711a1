"""The CPU back-end choices of the entry points (never made on import: a library leaves its
host's process state alone).

`configure_cpu_backend()` adds two XLA:CPU flags to `XLA_FLAGS`, each unless XLA_FLAGS already
names it, and neither if CLADE_JAX_KEEP_XLA_FLAGS=1 is set. `train.py`, `evaluate.py`, the
`python -m clade_jax....` commands (`clade_jax.cli.run`), the benchmarks and the test suite's
conftest call it first.

* `--xla_cpu_experimental_ynn_fusion_type=`: Eigen convolutions instead of YNNPACK (jaxlib
  0.10's default). Measured on this project's 2-core CPU with
  `benchmarks/generators.py --backend_compare` (benchmarks/RESULTS.md, CPU time, Eigen /
  YNNPACK): CLADE inference 0.88-0.94, convolution-only inference 0.80-0.94, SPADE inference
  1.06, CLADE training 0.96-1.14, SPADE training 0.85 — Eigen is the better default here.
* `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU orders a program's
  instructions with its memory-minimizing (depth-first) scheduler instead of the breadth-first
  one that exposes concurrency between independent instructions. The full-size training step's
  temporaries (`compiled.memory_analysis()`, batch 1): CLADE 0.925 -> 0.717 GB, SPADE 1.747 ->
  1.155 GB from this flag alone (0.666 / 1.054 GB with `conv`'s in-place kernel updates); the
  process's resident set while stepping CLADE 2.47 -> 2.25 GB; step time within the run-to-run
  spread (CLADE b1 4.48-5.02 s default vs 4.22-4.67 s, alternating `benchmarks/training.py
  --child clade,1` runs; benchmarks/RESULTS.md). On 2 cores the
  convolutions' own thread pool already keeps both busy.

The flags affect only the CPU backend and only take effect before JAX initialises its backends
(the first computation or device query), so call it before that.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
CPU_FLAGS = {YNN_FLAG: "", SCHEDULER_FLAG: "false"}
KEEP_ENV = "CLADE_JAX_KEEP_XLA_FLAGS"


def configure_cpu_backend(environ=None) -> bool:
    """Add `CPU_FLAGS` to XLA_FLAGS (see the module docstring); True if XLA_FLAGS changed.

    Args:
      environ: the environment to change (default `os.environ`; tests pass a dict).
    """
    env = os.environ if environ is None else environ
    if env.get(KEEP_ENV) == "1":
        return False
    flags = env.get("XLA_FLAGS", "")
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    if not added:
        return False
    env["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return True
