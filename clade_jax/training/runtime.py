"""The training runtime: what the GAN loop and the segmenter's trainer share.

* `make_mesh`, `shard_batch`: one data-parallel mesh over every device of every process, and
  process-local numpy batches made global arrays sharded along it.
* `init_key`: the initialisation key (`init_prng`'s hash generator: the init compiles 2x faster
  than with XLA's RngBitGenerator, ~5x faster than with threefry).
* `create_writer`: TensorBoard event files written with `tensorboardX` (no TensorFlow): scalars,
  images (uint8 HWC or NHWC) and hyperparameters under the tags given, by process 0 only.
* `Preemption`: SIGTERM turns into a stop that every process agrees on. One process: a Python
  signal handler sets a flag. Several processes (`jax.distributed`): JAX's preemption service
  (the one orbax's `CheckpointManager.reached_preemption` reads) catches SIGTERM on any host,
  shares the notice through the coordination service and names one step, the same for all
  processes, at which they save and stop; no collective runs on the devices for it.
* `check_finite`: a NaN / inf metric raises naming the metric and the step.
* `Progress`: a tqdm bar with rate and ETA on a terminal, plain periodic lines otherwise, and the
  step lines (losses, steps per second, ETA) at INFO; for training and every other long phase.

Logging goes through the `clade_jax` loggers; `clade_jax.cli` decides what reaches the console.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clade_jax.training import init_prng

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- mesh and keys


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(batch: Mapping[str, Any], sharding: NamedSharding, keys: Iterable[str]) -> dict:
    """This process's numpy batch -> global arrays sharded along the batch axis (only `keys`)."""
    keys = set(keys)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
        if k in keys
    }


def init_key(seed: int) -> jax.Array:
    """The key that initialises a network's parameters.

    `clade_jax.training.init_prng.IMPL`, a counter-based hash generator, instead of the default
    threefry: with threefry every parameter shape compiles its own unrolled 20-round sampler
    (1-3 s each on a 2-core CPU), with XLA's RngBitGenerator ("rbg", used here until
    2026-12-02) each still expands into a ~3k-line program; the init of the full-size ADE20k
    CLADE GAN compiles in 5.9 s with the hash against 12.5 s with rbg and 18.9 s with threefry
    (`benchmarks/init_compile.py`). The weights differ from a threefry initialisation's (same
    distributions), which does not matter for a network that is trained and checkpointed.
    Training randomness (dropout, the VAE's noise) keeps the default PRNG.
    """
    return jax.random.key(seed, impl=init_prng.IMPL)


# ----------------------------------------------------------------------------- checks


def check_finite(metrics: Mapping[str, float], step: int) -> None:
    """Raise FloatingPointError naming the metric and step if a metric is NaN or inf."""
    for name, value in metrics.items():
        if not np.isfinite(value):
            raise FloatingPointError(
                f"{name} became {value} at step {step}. Likely causes: label values outside "
                "[0, num_classes) reached the model (the normalization layers turn them into NaN; "
                "check config.data.num_classes / label_255_to), or the run diverged (lower the "
                "learning rates or use float32)."
            )


# ----------------------------------------------------------------------------- TensorBoard


class MetricWriter:
    """TensorBoard event files in `logdir` (tensorboardX's event writer; no TensorFlow).

    The interface of clu's metric writers (`write_scalars`, `write_images`, `write_hparams`,
    `flush`, `close`), so the tags are those given: a scalar `{"G_GAN": x}` is the tag "G_GAN".
    `enabled=False` (processes other than 0) writes nothing. Events are written by tensorboardX's
    background thread; `flush()` waits for them.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    @property
    def logdir(self) -> str | None:
        return None if self._writer is None else self._writer.logdir

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """images: {tag: uint8 (H, W, C) or (N, H, W, C)}; N > 1 is written as one grid image."""
        if self._writer is None:
            return
        for tag, value in images.items():
            value = np.asarray(value)
            if value.ndim == 4 and value.shape[0] == 1:
                value = value[0]
            if value.ndim == 3:
                self._writer.add_image(tag, value, global_step=int(step), dataformats="HWC")
            elif value.ndim == 4:
                self._writer.add_images(tag, value, global_step=int(step), dataformats="NHWC")
            else:
                raise ValueError(
                    f"image {tag!r}: expected (H, W, C) or (N, H, W, C), got {value.shape}"
                )

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The hyperparameters (a flat dict) for TensorBoard's HPARAMS tab, in this run's own
        event file (as TensorFlow's `hparams_api.hparams` does): values other than bool, int,
        float and str are written as their `str`."""
        if self._writer is None:
            return
        from tensorboardX.summary import hparams as hparams_summary

        clean = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()
        }
        _, session_start, _ = hparams_summary(clean, {})
        self._writer._get_file_writer().add_summary(session_start)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def create_writer(logdir: str | os.PathLike, *, enabled: bool | None = None) -> MetricWriter:
    """A `MetricWriter` for `logdir`; by default enabled on process 0 only."""
    return MetricWriter(logdir, enabled=jax.process_index() == 0 if enabled is None else enabled)


# ----------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM -> a stop every process agrees on; use as a context manager around the loop.

    Call `reached(step, manager)` after every step (all processes, every step, with the same
    step numbers): True means save a checkpoint at `step` and stop.

    * One process: a Python handler turns SIGTERM into a flag; `reached` returns it.
    * Several processes: JAX's preemption service, which `jax.distributed.initialize` starts,
      owns SIGTERM (no Python handler is installed, it would replace the service's). A notice on
      any host makes every host's `CheckpointManager.reached_preemption(step)` return True at the
      same step (the highest step any host had reached, plus one), so all hosts save the same
      step and leave the loop together instead of hanging in the next collective.
    """

    def __init__(self):
        self.requested = False
        self.mode = "local"  # "local" (one process), "service" or "allgather" (several)
        self._previous = None

    @staticmethod
    def _service_running() -> bool:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None

    def __enter__(self) -> Preemption:
        if jax.process_count() > 1 and self._service_running():
            self.mode = "service"
            return self
        if jax.process_count() > 1:
            self.mode = "allgather"
            log.warning(
                "the JAX preemption service is off (jax_enable_preemption_service): SIGTERM is "
                "agreed across processes with a small all-gather every step"
            )
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        log.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True

    def reached(self, step: int, manager) -> bool:
        """Whether every process stops (and saves) at `step` (call it on every process)."""
        if self.mode == "local":
            return self.requested
        if self.mode == "service":
            reached = bool(manager.reached_preemption(step))
            if reached:
                log.warning("preemption notice: every process saves step %d and stops", step)
                self.requested = True
            return reached
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.any(flags))

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ----------------------------------------------------------------------------- progress


def on_terminal() -> bool:
    """Whether the console (stderr) is a terminal: progress bars there, plain lines otherwise."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value: float) -> str:
    return f"{value:.4g}"


class Progress:
    """Progress of one long phase: a tqdm bar (rate, ETA) on a terminal, plain lines otherwise.

    Args:
      total: units of work in the phase (steps, images, ...).
      desc: what is being done, e.g. "training" (starts each line).
      unit: the unit's name, e.g. "step", "image".
      initial: units already done (a resumed run).
      every_s: off a terminal, a plain progress line at most this often (also on `close`).
      bar: force the bar on / off (default: on a terminal, process 0 only).
      enabled: False prints nothing (default: process 0 only).

    `update(n)` advances by n units, `set(count)` jumps to a count; `log(count, scalars)` advances
    to `count` and prints one INFO line "desc count/total: k=v ... | rate unit/s, ETA" (the step
    line), returning {"<unit>s_per_sec": rate, "uptime": seconds} for TensorBoard. Call either
    `update` or `log` for a unit, not both.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "step",
        initial: int = 0,
        every_s: float = 30.0,
        bar: bool | None = None,
        enabled: bool | None = None,
        logger: logging.Logger | None = None,
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.count = self._start = int(initial)
        self.every_s = every_s
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._log = logger or log
        self._t0 = self._t_line = time.monotonic()
        self._t_rate, self._count_rate = self._t0, self.count
        self._bar = None
        if self.enabled and (on_terminal() if bar is None else bar):
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=self.count,
                desc=desc,
                unit=unit,
                dynamic_ncols=True,
                file=sys.stderr,
                leave=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def rate(self) -> float:
        """Units per second since the previous `log` (or the start)."""
        dt = time.monotonic() - self._t_rate
        return (self.count - self._count_rate) / dt if dt > 0 else float("nan")

    def eta(self) -> float:
        """Seconds left at the mean rate of this phase."""
        done = self.count - self._start
        dt = time.monotonic() - self._t0
        if done <= 0 or dt <= 0:
            return float("nan")
        return (self.total - self.count) * dt / done

    def set(self, count: int) -> None:
        """Jump to `count` units done."""
        self.update(int(count) - self.count)

    def update(self, n: int = 1) -> None:
        """Advance by `n` units (off a terminal: a plain line at most every `every_s`)."""
        self._advance(n)
        if self.enabled and self._bar is None and self.count < self.total:
            if time.monotonic() - self._t_line >= self.every_s:
                self._line()

    def _advance(self, n: int) -> None:
        self.count += n
        if self._bar is not None and self.enabled:
            self._bar.update(n)

    def log(self, count: int | None = None, scalars: Mapping[str, float] | None = None) -> dict:
        """Advance to `count` and print the step line at INFO (values, rate, ETA).

        Returns:
          {"<unit>s_per_sec": rate since the previous `log`, "uptime": seconds} (TensorBoard).
        """
        if count is not None:
            self._advance(int(count) - self.count)
        rate = self.rate()
        out = {f"{self.unit}s_per_sec": rate, "uptime": time.monotonic() - self._t0}
        if self.enabled:
            self._line(scalars)
            if self._bar is not None and scalars:
                self._bar.set_postfix({k: _number(v) for k, v in list(scalars.items())[:4]})
        self._t_rate, self._count_rate = time.monotonic(), self.count
        return out

    def _line(self, scalars: Mapping[str, float] | None = None) -> None:
        values = " ".join(f"{k}={_number(v)}" for k, v in (scalars or {}).items())
        rate = self.rate()
        speed = f"{rate:.3g} {self.unit}s/s" if math.isfinite(rate) else f"- {self.unit}s/s"
        tail = f"{speed}, ETA {_duration(self.eta())}" if self.count < self.total else speed
        head = f"{self.desc} {self.count}/{self.total}"
        self._log.info("%s%s | %s", head, f": {values}" if values else "", tail)
        self._t_line = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
