"""clade_jax: semantic image synthesis (CLADE, SPADE and their baselines) in JAX / Flax NNX.

Importing the package selects XLA:CPU's Eigen convolutions instead of YNNPACK (jaxlib 0.10's
default) unless XLA_FLAGS already names `--xla_cpu_experimental_ynn_fusion_type` or
CLADE_JAX_KEEP_XLA_FLAGS=1 is set. On this project's CPU the Eigen path measured faster for the
generators' inference and much faster for weight gradients (benchmarks/generators.py,
benchmarks/RESULTS.md). The flag affects only the CPU backend and only takes effect when the
package is imported before JAX initialises its backends.
"""

import os

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _prefer_eigen_convolutions() -> None:
    if os.environ.get("CLADE_JAX_KEEP_XLA_FLAGS") == "1":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _YNN_FLAG in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()


_prefer_eigen_convolutions()

__version__ = "0.1.0"
