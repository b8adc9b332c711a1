"""Timing of the generators: the complexity table's runtime column (`measure_runtime`) and
`benchmarks/generators.py` share these pieces, so both time the same thing the same way.

* `compiled_forward(model, inputs)`: the jit-compiled inference forward as `clade_jax.inference`
  runs it (`model.eval()`, spectral norm folded into the kernels once; `fold=False` keeps the
  per-call recomputation), as a zero-argument call.
* `warm_up(calls)`: compile and run each call a few times (seconds each).
* `time_rounds(calls, rounds)`: alternating rounds (every call once per round, in order), the
  wall-clock and the process CPU time of each call (`block_until_ready`).
* `measure_runtime(config)`: the median wall time per image of a random-weight generator
  (`random_generator`, `random_module`: NumPy weights, no initialiser compilations) on random
  inputs.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
from flax import nnx

from clade_jax.evaluation.complexity.counts import forward, generator_inputs
from clade_jax.layers.conv import fold_spectral_norm
from clade_jax.models.build import build_generator

K = TypeVar("K", bound=Hashable)


def random_module(
    factory: Callable[[], nnx.Module],
    *,
    seed: int = 0,
    scale: float = 0.02,
    zeros: Sequence[str] = ("running_mean",),
    ones: Sequence[str] = ("running_var",),
) -> nnx.Module:
    """The module `factory()` builds, with random weights drawn by NumPy instead of its
    initialisers (which compile one small XLA program per distinct parameter shape: 15-30 s on a
    2-core CPU even for tiny models; timing and shape tests need only finite weights).

    Args:
      factory: builds the module (only traced, `nnx.eval_shape`).
      seed: NumPy seed.
      scale: standard deviation of the weights.
      zeros, ones: variable names set to 0 / 1 (running statistics, as after the real init).
        Spectral-norm vectors (`u`, `v`) are random unit vectors.

    Returns:
      The concrete module.
    """
    rng = np.random.default_rng(seed)
    graphdef, abstract = nnx.split(nnx.eval_shape(factory))

    def fill(path, spec):
        # The last key that names a variable (tree paths end in the Variable's 'value' field).
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name = next((n for n in reversed(names) if n not in ("value", "raw_value")), "")
        if name in zeros:
            return np.zeros(spec.shape, spec.dtype)
        if name in ones:
            return np.ones(spec.shape, spec.dtype)
        x = rng.standard_normal(spec.shape).astype(spec.dtype)
        if name in ("u", "v"):
            return x / np.linalg.norm(x)
        return scale * x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def random_generator(config: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    """The generator of `config` with random weights (`random_module`; for timing only).

    Returns:
      The concrete generator (in training mode, as `build_generator` returns it); BatchNorm
      running statistics are (0, 1), as after the real init.
    """
    return random_module(lambda: build_generator(config, rngs=nnx.Rngs(0)), seed=seed)


def compiled_forward(
    model: nnx.Module, inputs: Mapping[str, Any], *, fold: bool = True
) -> Callable[[], jax.Array]:
    """The jit-compiled inference forward of `model(**inputs)` as a zero-argument call.

    Args:
      model: a generator; put in eval mode (BatchNorm running statistics).
      inputs: its keyword inputs (`generator_inputs` names them), moved to the device once.
      fold: fold spectral norm into the kernels first, as inference does (`fold_spectral_norm`);
        False recomputes it from the stored vectors on every call (the plain eval module).

    Returns:
      A call that runs the compiled forward and returns its (not yet blocked-on) output.
    """
    model.eval()
    graphdef, state = nnx.split(fold_spectral_norm(model) if fold else model)
    fn = jax.jit(functools.partial(forward, graphdef))
    inputs = jax.device_put(dict(inputs))
    return lambda: fn(state, inputs)


def warm_up(calls: Mapping[K, Callable[[], Any]], runs: int = 2) -> dict[K, float]:
    """Run each call `runs` (>= 1) times (the first compiles); seconds each took in all."""
    seconds = {}
    for key, call in calls.items():
        start = time.perf_counter()
        for _ in range(max(runs, 1)):
            jax.block_until_ready(call())
        seconds[key] = time.perf_counter() - start
    return seconds


def time_rounds(
    calls: Mapping[K, Callable[[], Any]],
    rounds: int,
    *,
    after_round: Callable[[], None] | None = None,
) -> dict[K, dict[str, list[float]]]:
    """Alternating rounds: each round runs every call once, in order, until its output is ready.

    Args:
      calls: zero-argument calls (warmed up already: `warm_up`).
      rounds: how many rounds.
      after_round: called after each round (e.g. to record the load average).

    Returns:
      {key: {"wall": seconds per call (perf_counter), "cpu": the process's CPU seconds per call,
      all threads (process_time)}}, one entry per round. On a shared machine the CPU times are
      the steadier measurement.
    """
    out = {key: {"wall": [], "cpu": []} for key in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            out[key]["wall"].append(time.perf_counter() - wall)
            out[key]["cpu"].append(time.process_time() - cpu)
        if after_round is not None:
            after_round()
    return out


def random_inputs(
    model: nnx.Module, num_classes: int, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random keyword inputs of `model` (labels in [0, num_classes), instance ids, floats)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in generator_inputs(model, batch).items():
        if name == "labels":
            inputs[name] = rng.integers(0, num_classes, spec.shape, dtype=np.int32)
        elif name == "instance":
            inputs[name] = rng.integers(0, 4, spec.shape, dtype=np.int32)
        else:
            inputs[name] = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    return inputs


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
      warmup: untimed calls, the first of which compiles.
      seed: parameters and inputs.

    Returns:
      Median wall time of one call divided by `batch`.
    """
    model = random_generator(config, seed)
    inputs = random_inputs(model, config.data.num_classes, batch, seed)
    call = {"forward": compiled_forward(model, inputs)}
    warm_up(call, warmup)
    return statistics.median(time_rounds(call, repeats)["forward"]["wall"]) / batch
