"""The persistent XLA compilation cache of `train.py` (on by default).

Compiling the full-size GAN step takes 30-50 s on a 2-core CPU (benchmarks/training.py reports
it); with the cache a restarted or resumed run, and every later run of the same model and batch
shape, loads the executable instead (the benchmark's "cached" column). The cache folder is, in
order: `config.compilation_cache_dir` when set (`"none"` turns the cache off), the
`JAX_COMPILATION_CACHE_DIR` environment variable or a cache folder already configured in
`jax.config`, else `$XDG_CACHE_HOME/clade_jax/xla` (`~/.cache/clade_jax/xla`). Only programs that
took at least a second to compile are stored, so eager one-off ops do not fill it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clade_jax" / "xla"


def enable_compilation_cache(cache_dir: str | None = None) -> str | None:
    """Turn the persistent cache on (see the module docstring); returns the folder or None."""
    if cache_dir == "none":
        return None
    if not cache_dir:
        cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
            jax.config.jax_compilation_cache_dir
        )
        if cache_dir:
            return cache_dir  # the user's (or the test suite's) choice stands
        cache_dir = str(default_cache_dir())
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    log.debug("persistent compilation cache: %s", cache_dir)
    return cache_dir
