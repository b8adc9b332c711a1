"""clade_jax: semantic image synthesis (CLADE, SPADE and their baselines) in JAX / Flax NNX.

Importing the package selects XLA:CPU's Eigen convolutions instead of YNNPACK (jaxlib 0.10's
default) unless XLA_FLAGS already names `--xla_cpu_experimental_ynn_fusion_type` or
CLADE_JAX_KEEP_XLA_FLAGS=1 is set. Measured on this project's 2-core CPU with
`benchmarks/generators.py --backend_compare` (benchmarks/RESULTS.md, CPU time, Eigen / YNNPACK):
CLADE inference 0.88-0.94, convolution-only inference 0.80-0.94, SPADE inference 1.06, CLADE
training 0.96-1.14, SPADE training 0.85 — Eigen is the better default for most of the work here,
though by far less than the 1.4x first reported. The flag affects only the CPU backend and only
takes effect when the package is imported before JAX initialises its backends.
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
