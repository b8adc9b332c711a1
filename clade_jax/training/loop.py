"""The training loop: `train_and_evaluate(config, workdir)`, what `train.py` calls.

* One `Mesh` over every device of every process, axis "data": the state is replicated, batches
  are sharded along it (`jax.make_array_from_process_local_data`), so BatchNorm statistics are
  global (synchronized) and gradients are all-reduced by XLA. The same code runs on 1 CPU, 8 GPUs
  or a multi-host TPU pod.
* The step is compiled once with the state donated; randomness is `fold_in(key, step)`.
* Resume by default: a workdir with a checkpoint continues from it (state and data position).
  SIGTERM saves a checkpoint and stops cleanly; with several processes they agree on the step
  first (`runtime.Preemption`).
* TensorBoard (`runtime.create_writer`, no TensorFlow): scalars every `log_every_steps` (every
  loss, learning rates, steps/s), image grids (label | synthesized | real) every
  `image_every_steps` (also as PNG under `workdir/samples`; 0: none), the config as
  hyperparameters; each cadence also fires on the last step. A preemption's stop only logs and
  saves (no samples, no evaluation: the grace period is short). Metrics are checked for NaN / inf
  where they are logged.
* Console (`runtime.Progress`): a start line, one line per `log_every_steps` (losses, steps/s,
  ETA), a progress bar on a terminal, a line per checkpoint; the parameter table goes to
  `workdir/parameters.txt`.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from clade_jax.data import make_source, make_train_iterator
from clade_jax.layers import spade_windows
from clade_jax.models import build
from clade_jax.models.vgg import load_vgg19
from clade_jax.training import checkpoint, runtime
from clade_jax.training.compile_cache import enable_compilation_cache
from clade_jax.training.memory import release_host_memory
from clade_jax.training.runtime import check_finite, make_mesh
from clade_jax.training.state import GANState, lr_factor, total_steps
from clade_jax.training.step import MODEL_INPUTS, make_train_step, sample_train_mode
from clade_jax.visualize import image_grid

__all__ = ["check_finite", "make_mesh", "shard_batch", "train_and_evaluate"]

log = logging.getLogger(__name__)


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's numpy batch -> global arrays (the model's inputs) sharded along the batch."""
    return runtime.shard_batch(batch, sharding, MODEL_INPUTS)


def abstract_batch(iterator, sharding: NamedSharding) -> dict:
    """Shapes and dtypes of the global batches that `shard_batch` makes from `iterator`'s, as
    `jax.ShapeDtypeStruct`s with `sharding`; reads one batch and puts the iterator back."""
    position = iterator.get_state()
    local = next(iterator)
    iterator.set_state(position)
    n = jax.process_count()
    out = {}
    for k, v in local.items():
        if k in MODEL_INPUTS:
            dtype = jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)
            out[k] = jax.ShapeDtypeStruct((v.shape[0] * n, *v.shape[1:]), dtype, sharding=sharding)
    return out


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
    enable_compilation_cache(config.get("compilation_cache_dir", ""))
    mesh = make_mesh() if mesh is None else mesh
    if config.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {mesh.size} "
            "devices of the mesh"
        )
    log.info(
        "training on %d devices in %d processes (this is process %d; %s)",
        mesh.size,
        jax.process_count(),
        jax.process_index(),
        ", ".join(sorted({_device_name(d) for d in mesh.devices.flat})),
    )
    dataset_size = len(make_source(config.data, "train"))
    num_steps = total_steps(config, dataset_size)
    factor = lr_factor(config, dataset_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    iterator = make_train_iterator(
        config.data,
        global_batch_size=config.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    config = _resolve_spade_windows(config, iterator)
    checkpoint.write_config(config, workdir)

    init_key = runtime.init_key(config.seed)
    train_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    make_state = lambda key: GANState(config, dataset_size, rngs=nnx.Rngs(key))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make_state(init_key)))
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    vgg = load_vgg19(config.loss.vgg_weights) if config.loss.lambda_vgg > 0 else None
    vgg = jax.device_put(vgg, replicated) if vgg is not None else None

    # Compiled from shapes before the state exists (see `make_train_step`).
    step_fn = make_train_step(graphdef, config, state_sharding, batch_sharding)
    step_fn.compile(
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract_state
        ),
        abstract_batch(iterator, batch_sharding),
        jnp.int32(0),
        train_key,
        vgg,
    )
    manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
    if manager.latest_step() is not None:
        state, iterator, start = checkpoint.restore(manager, abstract_state, replicated, iterator)
        log.info("resumed %s at step %d", workdir, start)
    else:
        init = jax.jit(lambda key: nnx.split(make_state(key))[1], out_shardings=state_sharding)
        state, start = init(init_key), 0
        if config.get("save_initial_checkpoint", False):
            checkpoint.save(manager, 0, state, iterator, force=True)
            log.info("checkpoint step 0 (the initialization) -> %s", manager.directory / "0")
    log.info(
        "%s: steps %d..%d of %d (batch %d, %d training examples)",
        workdir,
        start + 1,
        num_steps,
        num_steps,
        config.batch_size,
        dataset_size,
    )

    release_host_memory()  # what building the state freed (clade_jax.training.memory)
    sample_fn = jax.jit(lambda s, b, k: sample_train_mode(graphdef, s, b, k))
    writer = runtime.create_writer(workdir)
    if start == 0:
        _write_parameter_table(nnx.merge(graphdef, state), workdir)
        writer.write_hparams(traverse_util.flatten_dict(config.to_dict(), sep="."))
    progress = runtime.Progress(num_steps, "training", initial=start, logger=log)
    pending, step = [], start
    evaluators = None  # built at the first periodic evaluation, reused by the later ones
    with runtime.Preemption() as preemption, mesh, progress:
        for step in range(start, num_steps):
            local = next(iterator)
            batch = shard_batch(local, batch_sharding)
            state, metrics = step_fn(state, batch, jnp.int32(step), train_key, vgg)
            pending.append(metrics)
            done = step + 1
            # Every process calls this every step: they agree on the step they stop at.
            stop = preemption.reached(done, manager) or done == stop_after
            end = done == num_steps
            last = end or stop
            if done % config.log_every_steps == 0 or last:
                scalars = {
                    k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]
                }
                check_finite(scalars, done)
                f = float(factor(step))
                speed = progress.log(done, scalars)
                scalars.update(lr_g=config.optim.lr_g * f, lr_d=config.optim.lr_d * f, **speed)
                writer.write_scalars(done, scalars)
                pending = []
            else:
                progress.update()
            if config.image_every_steps > 0 and (done % config.image_every_steps == 0 or end):
                _write_samples(
                    sample_fn, state, batch, local, train_key, done, config, mesh, writer, workdir
                )
            evaluate_now = config.eval_every_steps > 0 and (
                done % config.eval_every_steps == 0 or end
            )
            if done % config.checkpoint_every_steps == 0 or last or evaluate_now:
                checkpoint.save(manager, done, state, iterator, force=True)
                log.info("checkpoint step %d -> %s", done, manager.directory / str(done))
            if evaluate_now:  # every process: each evaluates its shard
                progress.close()
                evaluators = _evaluate_during_training(manager, workdir, done, config, evaluators)
            if stop:
                break
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return graphdef, state


def _resolve_spade_windows(config, iterator):
    """`config`, or a copy with `model.spade_windows = "auto"` turned into "on" / "off" from the
    first training batch's label maps (their interior fraction, averaged over the processes so
    that all build one program); for a generator with SPADE layers it reads one batch and puts
    the iterator back. A resumed run resolves it from the same first batch (before the restore
    moves the iterator), so it makes the same choice."""
    if config.model.get("spade_windows", "off") != "auto":
        build.spade_windows_enabled(config)  # validates the field
        return config
    config = config.copy_and_resolve_references()
    if not build.has_spade_layers(config):  # "off" without reading a batch
        log.info(
            "model.spade_windows: auto -> %s (no SPADE layer)",
            build.resolve_spade_windows(config, 0.0),
        )
        return config
    position = iterator.get_state()
    labels = next(iterator)["label"]
    iterator.set_state(position)
    fraction = spade_windows.interior_fraction(labels, config.data.num_classes)
    if jax.process_count() > 1:
        fraction = float(np.mean(multihost_utils.process_allgather(np.float32(fraction))))
    choice = build.resolve_spade_windows(config, fraction)
    log.info(
        "model.spade_windows: auto -> %s (interior fraction of the first batch %.3f; threshold "
        "%.2f, clade_jax/layers/spade_windows.py)",
        choice,
        fraction,
        spade_windows.AUTO_MIN_INTERIOR,
    )
    return config


def _device_name(device) -> str:
    """ "cpu", "gpu (NVIDIA H100 80GB HBM3)", "tpu (TPU v5 lite)"."""
    kind = device.device_kind
    return device.platform if kind.lower() == device.platform else f"{device.platform} ({kind})"


def _write_parameter_table(model: GANState, workdir: str) -> None:
    """One line per network at INFO, and every parameter's shape in `workdir/parameters.txt`."""
    lines = []
    for name in ("gen", "d"):
        params = nnx.state(getattr(model, name), nnx.Param).to_pure_dict()
        flat = traverse_util.flatten_dict(params, sep="/")
        total = sum(int(np.prod(v.shape)) for v in flat.values())
        log.info("%s: %s parameters in %d arrays", name, f"{total:,}", len(flat))
        lines.append(f"{name}: {total:,} parameters")
        lines += [f"  {k}  {tuple(v.shape)}  {v.dtype}" for k, v in sorted(flat.items())]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "parameters.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def _evaluate_during_training(manager, workdir: str, step: int, config, evaluators=None):
    """`evaluate.py` on the checkpoint just written (FID, and mIoU with eval.segmenter_workdir);
    results go to workdir/eval/<step>.json and TensorBoard (process 0 writes them; every
    process synthesizes and scores its shard of the split, as `evaluate.py` on several hosts).

    The evaluators (Inception, the segmenter, the protocol) are built at the first call and
    returned; passing them back makes every later evaluation reuse them and the compiled
    evaluation program (only the generator's weights change).
    """
    from clade_jax.evaluation import evaluate as evaluation

    manager.wait_until_finished()
    if evaluators is None:
        evaluators = evaluation.build_evaluators(
            config, segmenter_workdir=config.eval.segmenter_workdir or None
        )
    result = evaluation.evaluate(workdir, step=step, evaluators=evaluators)
    scores = " ".join(f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float))
    log.info("step %d evaluation: %s", step, scores)
    return evaluators


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
