"""The CPU back-end choice of the entry points (never made on import: a library leaves its host's
process state alone).

`configure_cpu_backend()` selects XLA:CPU's Eigen convolutions instead of YNNPACK (jaxlib 0.10's
default) by adding `--xla_cpu_experimental_ynn_fusion_type=` to `XLA_FLAGS`, unless XLA_FLAGS
already names that flag or CLADE_JAX_KEEP_XLA_FLAGS=1 is set. `train.py`, `evaluate.py`, the
`python -m clade_jax....` commands (`clade_jax.cli.run`), the benchmarks and the test suite's
conftest call it first. Measured on this project's 2-core CPU with
`benchmarks/generators.py --backend_compare` (benchmarks/RESULTS.md, CPU time, Eigen / YNNPACK):
CLADE inference 0.88-0.94, convolution-only inference 0.80-0.94, SPADE inference 1.06, CLADE
training 0.96-1.14, SPADE training 0.85 — Eigen is the better default for most of the work here.
The flag affects only the CPU backend and only takes effect before JAX initialises its backends
(the first computation or device query), so call it before that.
"""

from __future__ import annotations

import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
KEEP_ENV = "CLADE_JAX_KEEP_XLA_FLAGS"


def configure_cpu_backend(environ=None) -> bool:
    """Prefer Eigen convolutions on XLA:CPU (see the module docstring); True if XLA_FLAGS changed.

    Args:
      environ: the environment to change (default `os.environ`; tests pass a dict).
    """
    env = os.environ if environ is None else environ
    if env.get(KEEP_ENV) == "1":
        return False
    flags = env.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True
