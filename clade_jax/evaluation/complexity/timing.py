"""The table's runtime column: the median wall time of the jit-compiled inference forward
(`measure_runtime`; see the package docstring)."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from clade_jax.evaluation.complexity.counts import forward, generator_inputs
from clade_jax.layers.conv import fold_spectral_norm
from clade_jax.models.build import build_generator


def random_generator(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    """The generator of `config` with random weights drawn by NumPy (for timing only).

    Running the real initialisers compiles one small XLA program per distinct parameter shape,
    which takes 15-30 s on a 2-core CPU even for the tiny models; timing does not need the
    official initialisation, only finite weights of the right shapes. BatchNorm running
    statistics are (0, 1) and spectral-norm vectors unit vectors, as after the real init.

    Args:
      config: a generator config.
      seed: NumPy seed.

    Returns:
      The concrete generator (in training mode, as `build_generator` returns it).
    """
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: build_generator(config, rngs=nnx.Rngs(0)))
    )

    def fill(path, spec):
        # The last key that names a variable (tree paths end in the Variable's 'value' field).
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = next((n for n in reversed(names) if n not in ("value", "raw_value")), "")
        if name == "running_var":
            return np.ones(spec.shape, spec.dtype)
        if name == "running_mean":
            return np.zeros(spec.shape, spec.dtype)
        x = rng.standard_normal(spec.shape).astype(spec.dtype)
        if name in ("u", "v"):
            return x / np.linalg.norm(x)
        return 0.02 * x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def measure_runtime(
    config: ml_collections.ConfigDict,
    *,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> float:
    """Median seconds per image of the jit-compiled inference forward on the default device.

    Args:
      config: a generator config (allocates its parameters, random: see `random_generator`).
      batch: images per call.
      repeats: timed calls (the median is returned).
      warmup: untimed calls after compilation.
      seed: parameters and inputs.

    Returns:
      Median wall time of one call divided by `batch`.
    """
    model = random_generator(config, seed)
    model.eval()
    model = fold_spectral_norm(model)  # as inference does (clade_jax.synthesize)
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in generator_inputs(model, batch).items():
        if name == "labels":
            inputs[name] = rng.integers(0, config.data.num_classes, spec.shape, dtype=np.int32)
        elif name == "instance":
            inputs[name] = rng.integers(0, 4, spec.shape, dtype=np.int32)
        else:
            inputs[name] = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    inputs = jax.device_put(inputs)
    graphdef, state = nnx.split(model)
    fn = jax.jit(functools.partial(forward, graphdef))
    for _ in range(max(warmup, 1)):  # the first call compiles
        fn(state, inputs).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(state, inputs).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch
