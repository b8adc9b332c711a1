"""Checkpoints of a run: orbax `CheckpointManager` over the train state and the data iterator.

A checkpoint holds the whole train state (the GAN's `nnx.State`: networks, optimizer states, EMA,
buffers, as a pure dict; or any pytree, e.g. the segmenter's `SegState`), and the grain iterator
position (`grain.checkpoint.CheckpointSave`), so a resumed run sees
exactly the batches an uninterrupted one would have. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a crash or SIGTERM leaves the last good one;
`wait_until_finished()` is called before the process exits.

`workdir/config.json` holds the config of the run; `load_config(workdir)` reads it back, so
evaluation and synthesis need only the workdir.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

# orbax's own default jax.Array handler is built with this store (not exported publicly)
from orbax.checkpoint._src.metadata import array_metadata_store

CHECKPOINT_DIR = "checkpoints"


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write `workdir/config.json` (process 0 only, atomically)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with (`workdir/config.json`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a clade_jax workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


# Orbax's replica-parallel save cuts every replicated array into one piece per replica (8 on the
# tests' 8 host devices), each piece a dispatched slice op, compiled anew for each new shape: the
# tiny test model's ~340 arrays took ~1.9 s per save, most of a short run (8 replicas, 2 CPUs).
# Pieces under this size are written whole by replica 0; a pod still shares the big arrays.
# The handler is otherwise orbax's default one (with its per-array metadata store), registered
# once per process.
MIN_REPLICA_SLICE_BYTES = 16 << 20
_REGISTERED = [False]


def _write_small_arrays_whole() -> None:
    if _REGISTERED[0]:
        return
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _REGISTERED[0] = True


def make_manager(
    workdir: str, *, keep: int = 3, save_interval_steps: int = 1, with_data: bool = True
) -> ocp.CheckpointManager:
    """An async CheckpointManager under `workdir/checkpoints` keeping the last `keep`."""
    _write_small_arrays_whole()
    items = ("state", "data") if with_data else ("state",)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options, item_names=items
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    data_iterator=None,
    *,
    force: bool = False,
) -> bool:
    """Start an (async) save of `state` (an `nnx.State` or any pytree) and the data iterator."""
    tree = state.to_pure_dict() if isinstance(state, nnx.State) else state
    args = {"state": ocp.args.StandardSave(tree)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore(
    manager: ocp.CheckpointManager,
    abstract_state,
    sharding=None,
    data_iterator=None,
    step: int | None = None,
):
    """Restore (state, data iterator, step) of the latest (or the given) step.

    Args:
      manager: from `make_manager`.
      abstract_state: shapes and dtypes: an `nnx.State` (`nnx.split(nnx.eval_shape(...))[1]`)
        or any pytree of arrays / `jax.ShapeDtypeStruct`s (`jax.eval_shape`).
      sharding: where the restored arrays go (e.g. replicated over the mesh); None = default.
      data_iterator: a fresh iterator of the same config, whose position is restored.
      step: which checkpoint; None = the latest.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    is_nnx = isinstance(abstract_state, nnx.State)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract_state.to_pure_dict() if is_nnx else abstract_state,
    )
    args = {"state": ocp.args.StandardRestore(target)}
    # A converted official checkpoint has no data position: the iterator then starts fresh.
    has_data = os.path.isdir(os.path.join(str(manager.directory), str(step), "data"))
    if data_iterator is not None and has_data:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    state = restored["state"]
    if is_nnx:
        state = abstract_state
        nnx.replace_by_pure_dict(state, restored["state"])
    return state, (restored["data"] if "data" in args else data_iterator), step


def load_models(workdir: str, step: int | None = None, *, use_ema: bool = True):
    """Restore a run's networks for inference: (config, generator, encoder or None, step).

    The generator is the EMA copy when the run kept one (and `use_ema`), put in evaluation mode
    (BatchNorm running statistics, stored spectral-norm vectors), as `model.eval()` in PyTorch.
    Works on training workdirs and on those written by `python -m clade_jax.convert`.
    """
    from clade_jax.data import make_source
    from clade_jax.training.state import GANState

    config = load_config(workdir)
    dataset_size = _dataset_size(config, make_source)
    abstract = nnx.eval_shape(lambda: GANState(config, dataset_size, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    manager = make_manager(workdir, keep=config.get("keep_checkpoints", 3))
    # On this process's first device: the checkpoint may come from another topology (8 devices
    # -> 1, or 2 processes); evaluation places the weights on its own mesh.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state, _, step = restore(manager, abstract_state, local, step=step)
    manager.close()
    model = nnx.merge(graphdef, state)
    g = model.g_ema if (use_ema and model.g_ema is not None) else model.gen.g
    g.eval()
    e = model.gen.e
    if e is not None:
        e.eval()
    return config, g, e, step


def _dataset_size(config, make_source) -> int:
    """Training-set size (it sets the learning-rate schedule); 1 when the data is not at hand
    (e.g. evaluating a converted official checkpoint elsewhere), which only affects the
    optimizer's schedule, not the restored weights."""
    try:
        return len(make_source(config.data, "train"))
    except (OSError, ValueError):
        return 1
