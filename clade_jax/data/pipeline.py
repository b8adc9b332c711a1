"""grain input pipelines: shuffled, augmented, sharded training batches and exact evaluation passes.

    it = make_train_iterator(config.data, global_batch_size=32, seed=0)
    batch = next(it)   # {'label': (B, H, W) int32, 'image': (B, H, W, 3) float32 in [-1, 1],
                       #  'instance': (B, H, W) int32 if use_instance,
                       #  'icpe': (B, H, W, 2) float32 if icpe}
    state = it.get_state()   # JSON-able dict; it.set_state(state) resumes exactly

Training chain (grain `MapDataset`, then one `IterDataset` stage):

    source -> shuffle(seed) -> repeat(num_epochs) -> [truncate to whole global batches]
      -> map_with_index(TrainTransform)  # augmentation keyed by the global stream position
      -> [process_index::process_count]  # this process's share of every global batch
      -> batch(global_batch_size // process_count, drop_remainder=True)
      -> to_iter_dataset(threads) -> mp_prefetch(num_workers) -> map(to_model_inputs)

Why this order:
* The shuffle is global and reshuffled every epoch (grain folds the epoch into the seed). The
  augmentation of an example depends only on (seed, stream position).
* Sharding takes every process_count-th element of the global stream, so the union of the
  processes' local batches k is exactly the global batch k of a single-process run: the data seen
  does not depend on the number of hosts, and the per-process shards are disjoint.
* Batching happens before `to_iter_dataset`, so each grain worker produces whole batches and the
  output does not depend on `num_workers` either.
* Images stay uint8 until after the worker processes (4x less to copy between processes).

Checkpointing: the returned iterator is a `grain.DatasetIterator`; `get_state()` is a small
JSON-able dict (the position in the stream), `set_state()` restores it, and with orbax
(orbax-checkpoint >= 0.12, grain >= 0.2.18):

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(workdir / "checkpoints")
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(it)))       # writes process_<i>-of-<n>.json
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(it)))    # `it`: a fresh iterator, same config

Restoring needs the same config (data set, batch size, seed, process count and num_workers).

Evaluation (`make_eval_iterator`): no shuffle, no flip, test-time resize; every example exactly
once. The last global batch is padded (with copies of real examples) and `mask` (B,) bool marks the
real ones; `index` (B,) int32 is the example's index in the split (-1 for padding) and `name` (B,)
its name ('' for padding).
"""

from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np

from clade_jax.data.sources import make_source
from clade_jax.data.transforms import AugmentOptions, EvalTransform, TrainTransform, to_model_inputs


def _get(data_cfg: Any, name: str, default: Any) -> Any:
    if isinstance(data_cfg, dict):
        return data_cfg.get(name, default)
    return getattr(data_cfg, name, default)


def _process_index_and_count(process_index: int | None, process_count: int | None):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return process_index, process_count


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch size {batch_size} must be a positive multiple of the process count "
            f"{process_count}"
        )
    return batch_size // process_count


def ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; mark them parsed when no absl app did (tests,
    notebooks), keeping every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(ds: grain.MapDataset, data_cfg: Any) -> grain.IterDataset:
    """Threaded reading in each process, then optional worker processes, then float images."""
    threads = max(int(_get(data_cfg, "read_threads", 2)), 1)
    prefetch = max(int(_get(data_cfg, "prefetch_buffer", 2)), 1)
    # A buffer smaller than the thread count would leave threads idle (grain warns).
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    it = ds.to_iter_dataset(read)
    num_workers = int(_get(data_cfg, "num_workers", 0))
    if num_workers > 0:
        ensure_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
        )
    return it.map(to_model_inputs)


def _shuffle_seed(seed: int) -> int:
    # grain's index shuffle takes a 32-bit seed; derive it so that the shuffle and the
    # augmentation (which uses (seed, 1, position)) are independent streams.
    return int(np.random.SeedSequence([int(seed), 0]).generate_state(1)[0])


def build_train_dataset(
    data_cfg: Any,
    *,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    keep_names: bool = False,
) -> grain.IterDataset:
    """The training pipeline as a grain `IterDataset` (see the module docstring).

    Args: as `make_train_iterator`, plus `keep_names` to keep each example's `name` in the
      batches (tests and debugging).

    Returns:
      A grain IterDataset of batches.
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    local_batch = _local_batch_size(global_batch_size, process_count)
    seed = int(_get(data_cfg, "shuffle_seed", 0) if seed is None else seed)
    if num_epochs is not None and num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    source = make_source(data_cfg, "train")
    n = len(source)
    if num_epochs is not None and n * num_epochs < global_batch_size:
        raise ValueError(
            f"{n} training examples x {num_epochs} epochs give no full batch of {global_batch_size}"
        )
    opts = AugmentOptions.from_config(data_cfg)
    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=_shuffle_seed(seed))
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:  # whole global batches only, so every process gets as many
        ds = ds[: len(ds) // global_batch_size * global_batch_size]
    ds = ds.map_with_index(TrainTransform(opts, seed, keep_names=keep_names))
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    return _to_iter(ds, data_cfg)


def make_train_iterator(
    data_cfg: Any,
    *,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> grain.DatasetIterator:
    """Iterator over this process's training batches.

    Args:
      data_cfg: `config.data`.
      global_batch_size: batch size summed over all processes; each process gets
        global_batch_size // process_count examples per batch.
      seed: pipeline seed (shuffle order and augmentation); None uses `data_cfg.shuffle_seed`.
      process_index, process_count: this process and how many; None asks JAX.
      num_epochs: None repeats forever; else stops after that many epochs (whole batches only).

    Returns:
      A `grain.DatasetIterator` of dicts: `label` (B, H, W) int32, `image` (B, H, W, 3) float32 in
      [-1, 1], `instance` (B, H, W) int32 if `use_instance`, `icpe` (B, H, W, 2) float32 if `icpe`.
      It has `get_state()` / `set_state()` for exact resumption.
    """
    ds = build_train_dataset(
        data_cfg,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )
    return iter(ds)


class _EvalExample:
    """Index in the padded split -> transformed example with `mask`, `index` and `name`."""

    def __init__(self, source, transform: EvalTransform):
        self.source, self.transform = source, transform

    def __call__(self, index: int) -> dict:
        n = len(self.source)
        real = index < n
        example = self.transform(self.source[index if real else index % n])
        example["mask"] = np.bool_(real)
        example["index"] = np.int32(index if real else -1)
        example["name"] = str(example.get("name", "")) if real else ""
        return example


def build_eval_dataset(
    data_cfg: Any,
    *,
    batch_size: int,
    split: str = "validation",
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The evaluation pipeline as a grain `IterDataset`; see `make_eval_iterator`."""
    process_index, process_count = _process_index_and_count(process_index, process_count)
    local_batch = _local_batch_size(batch_size, process_count)
    source = make_source(data_cfg, split)
    padded = math.ceil(len(source) / batch_size) * batch_size
    ds = grain.MapDataset.range(padded)
    ds = ds.map(_EvalExample(source, EvalTransform(AugmentOptions.from_config(data_cfg))))
    ds = ds[process_index::process_count]
    ds = ds.batch(local_batch, drop_remainder=True)
    return _to_iter(ds, data_cfg)


def make_eval_iterator(
    data_cfg: Any,
    *,
    batch_size: int,
    split: str = "validation",
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """One pass over a split, every example exactly once, in order.

    Args:
      data_cfg: `config.data`.
      batch_size: global batch size (summed over processes).
      split: 'validation' or 'train'.
      process_index, process_count: this process and how many; None asks JAX.

    Returns:
      An iterator of batch dicts as in training plus `mask` (B,) bool (False for padding),
      `index` (B,) int32 (-1 for padding) and `name` (B,) str. Every process gets the same
      number of batches; the union of the real entries over processes and batches is the split.
    """
    ds = build_eval_dataset(
        data_cfg,
        batch_size=batch_size,
        split=split,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(ds)
