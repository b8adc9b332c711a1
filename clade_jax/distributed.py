"""Multi-process set-up shared by the entry points: `jax.distributed.initialize` from flags.

On CPU (tests, this project's CI) cross-process collectives use gloo.
"""

from __future__ import annotations

import jax
from absl import flags


def define_flags() -> None:
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (auto-detect)")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
    flags.DEFINE_integer("process_id", None, "this process's id (multi-process)")


def initialize(
    coordinator_address=None, num_processes=None, process_id=None, auto: bool = False
) -> None:
    """Initialise JAX's multi-process runtime when asked to (explicit arguments or `auto`)."""
    if coordinator_address is None and not auto:
        return
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is None:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )


def initialize_from_flags() -> None:
    f = flags.FLAGS
    initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
