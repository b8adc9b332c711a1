"""The training loop: `train_and_evaluate(config, workdir)`, what `train.py` calls.

* One `Mesh` over every device of every process, axis "data": the state is replicated, batches
  are sharded along it (`jax.make_array_from_process_local_data`), so BatchNorm statistics are
  global (synchronized) and gradients are all-reduced by XLA. The same code runs on 1 CPU, 8 GPUs
  or a multi-host TPU pod.
* The step is compiled once with the state donated; randomness is `fold_in(key, step)`.
* Resume by default: a workdir with a checkpoint continues from it (state and data position).
  SIGTERM saves a checkpoint and stops cleanly.
* clu: scalars every `log_every_steps` (every loss, learning rates, steps/s), image grids
  (label | synthesized | real) every `image_every_steps` (also as PNG under `workdir/samples`), a
  parameter overview at the start; each cadence also fires on the last step. Metrics are checked
  for NaN / inf where they are logged.
"""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from clade_jax.data import make_source, make_train_iterator
from clade_jax.data.synthetic import colorize
from clade_jax.models.vgg import load_vgg19
from clade_jax.training import checkpoint
from clade_jax.training.state import GANState, lr_factor, total_steps
from clade_jax.training.step import MODEL_INPUTS, make_train_step, sample_train_mode


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's numpy batch -> global arrays sharded along the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
        if k in MODEL_INPUTS
    }


def check_finite(metrics: dict, step: int) -> None:
    """Raise naming the metric and step if a loss became NaN or inf."""
    for name, value in metrics.items():
        if not np.isfinite(value):
            raise FloatingPointError(
                f"{name} became {value} at step {step}. Likely causes: label values outside "
                "[0, num_classes) reached the model (the normalization layers turn them into NaN; "
                "check config.data.num_classes / label_255_to), or the run diverged (lower the "
                "learning rates or use float32)."
            )


def image_grid(labels: np.ndarray, fake: np.ndarray, real: np.ndarray, num_classes: int):
    """Rows of [colourised label | synthesized | real] as one uint8 (H*rows, 3W, 3) image."""
    to_u8 = lambda x: np.clip((np.asarray(x, np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(
        np.uint8
    )
    rows = [
        np.concatenate([colorize(lab, num_classes), to_u8(f), to_u8(r)], axis=1)
        for lab, f, r in zip(labels, fake, real, strict=True)
    ]
    return np.concatenate(rows, axis=0)


class _StopSignal:
    """Turns SIGTERM into a flag the loop checks after each step (then it saves and stops)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. some test runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: Mesh | None = None,
    stop_after: int | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Train (or resume) the run of `config` in `workdir`.

    Args:
      config: a config from `configs/`.
      workdir: output folder (checkpoints, TensorBoard events, samples, config.json).
      mesh: the device mesh; default all devices of all processes.
      stop_after: checkpoint and stop after this many steps, as a preemption would (tests).

    Returns:
      (graphdef, state) of the final `GANState` (`nnx.merge` gives the modules).
    """
    mesh = make_mesh() if mesh is None else mesh
    if config.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {mesh.size} "
            "devices of the mesh"
        )
    logging.info(
        "training on %d devices in %d processes (this is process %d)",
        mesh.size,
        jax.process_count(),
        jax.process_index(),
    )
    checkpoint.write_config(config, workdir)
    dataset_size = len(make_source(config.data, "train"))
    num_steps = total_steps(config, dataset_size)
    factor = lr_factor(config, dataset_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    # The initialisation is compiled once per run; with the counter-based default PRNG that
    # compile takes ~4x longer (every parameter gets its own threefry expansion) than with the
    # RngBitGenerator-based "rbg" PRNG. Training randomness keeps the default PRNG.
    init_key = jax.random.key(config.seed, impl="rbg")
    train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    make_state = lambda key: GANState(config, dataset_size, rngs=nnx.Rngs(key))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make_state(init_key)))
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    vgg = load_vgg19(config.loss.vgg_weights) if config.loss.lambda_vgg > 0 else None
    vgg = jax.device_put(vgg, replicated) if vgg is not None else None

    iterator = make_train_iterator(
        config.data,
        global_batch_size=config.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
    if manager.latest_step() is not None:
        state, iterator, start = checkpoint.restore(manager, abstract_state, replicated, iterator)
        logging.info("resumed %s at step %d", workdir, start)
    else:
        init = jax.jit(lambda key: nnx.split(make_state(key))[1], out_shardings=state_sharding)
        state, start = init(init_key), 0
        if config.get("save_initial_checkpoint", False):
            checkpoint.save(manager, 0, state, iterator, force=True)

    step_fn = make_train_step(graphdef, config, state_sharding, batch_sharding)
    sample_fn = jax.jit(lambda s, b, k: sample_train_mode(graphdef, s, b, k))
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start == 0:
        for name in ("gen", "d"):
            params = nnx.state(getattr(nnx.merge(graphdef, state), name), nnx.Param)
            parameter_overview.log_parameter_overview(
                params.to_pure_dict(), msg=f"{name} parameters", include_stats=False
            )
        writer.write_hparams(_flat(config))
    report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    pending, step = [], start
    with _StopSignal() as stop, mesh:
        for step in range(start, num_steps):
            local = next(iterator)
            batch = shard_batch(local, batch_sharding)
            state, metrics = step_fn(state, batch, jnp.int32(step), train_key, vgg)
            pending.append(metrics)
            done = step + 1
            last = done == num_steps or stop.requested or done == stop_after
            report(done)
            if done % config.log_every_steps == 0 or last:
                scalars = {
                    k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]
                }
                check_finite(scalars, done)
                f = float(factor(step))
                scalars.update(lr_g=config.optim.lr_g * f, lr_d=config.optim.lr_d * f)
                writer.write_scalars(done, scalars)
                pending = []
            if done % config.image_every_steps == 0 or last:
                _write_samples(
                    sample_fn, state, batch, local, train_key, done, config, mesh, writer, workdir
                )
            evaluate_now = config.eval_every_steps > 0 and (
                done % config.eval_every_steps == 0 or last
            )
            if done % config.checkpoint_every_steps == 0 or last or evaluate_now:
                checkpoint.save(manager, done, state, iterator, force=True)
            if evaluate_now:
                _evaluate_during_training(manager, workdir, done, config)
            if stop.requested or done == stop_after:
                break
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    return graphdef, state


def _evaluate_during_training(manager, workdir: str, step: int, config) -> None:
    """`evaluate.py` on the checkpoint just written (FID, and mIoU with eval.segmenter_workdir);
    results go to workdir/eval/<step>.json and TensorBoard. Single-process runs only."""
    if jax.process_count() > 1:
        logging.warning("eval_every_steps: evaluation runs single-process; use evaluate.py")
        return
    from clade_jax.evaluation.evaluate import evaluate

    manager.wait_until_finished()
    result = evaluate(workdir, step=step, segmenter_workdir=config.eval.segmenter_workdir or None)
    logging.info(
        "step %d evaluation: %s", step, {k: v for k, v in result.items() if isinstance(v, float)}
    )


def _write_samples(sample_fn, state, batch, local, key, step, config, mesh, writer, workdir):
    fake = sample_fn(state, batch, jax.random.fold_in(key, step))
    fake = multihost_utils.global_array_to_host_local_array(fake, mesh, PartitionSpec("data"))
    n = min(config.num_image_samples, fake.shape[0])
    grid = image_grid(
        np.asarray(local["label"])[:n],
        np.asarray(fake)[:n],
        np.asarray(local["image"])[:n],
        config.data.num_classes,
    )
    writer.write_images(step, {"samples": grid[None]})
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        Image.fromarray(grid).save(os.path.join(workdir, "samples", f"step_{step:07d}.png"))


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
