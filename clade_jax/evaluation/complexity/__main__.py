"""`python -m clade_jax.evaluation.complexity` (see `cli.py`)."""

from clade_jax.backend import configure_cpu_backend
from clade_jax.evaluation.complexity.cli import main

if __name__ == "__main__":
    configure_cpu_backend()
    main()
