"""clade_jax: semantic image synthesis (CLADE, SPADE and their baselines) in JAX / Flax NNX.

Importing the package (or any module of it) changes nothing in the process: the CPU back-end
choice the entry points make is `clade_jax.backend.configure_cpu_backend`.
"""

__version__ = "0.1.0"
