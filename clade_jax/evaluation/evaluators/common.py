"""The per-batch evaluation runner shared by every evaluator (big_vision `evaluators/common.py`).

An evaluation pass is one loop over batches of an evaluation iterator. Per batch, ONE
jit-compiled function, sharded over the same data-parallel mesh as training (`NamedSharding`
over axis "data"), makes the uint8 images (synthesis with the generator, or the real images of
the batch) and runs the device part of every evaluator on them. It returns only what has to leave
the device: each evaluator's reductions (confusion-matrix counts, summed over the global batch
inside the jit, i.e. across devices and processes) or small per-example outputs gathered to every
process (Inception pool features), plus the uint8 images when they are written. Batches are padded
to one fixed size; `valid` (B,) marks the rows that count (padding of the last batch and rows past
`max_images` are excluded on device).

The host loop runs one batch ahead: batch b + 1 is read, transferred and dispatched before the
results of batch b are fetched, so data decoding, PNG writes and the host statistics overlap the
device. Companion runners (`Runner.run(companions=...)`) run their own programs on the same
batches in the same pass (each batch read and transferred once), e.g. the FID reference
features of the evaluated examples' real images beside the synthesis.

Multi-process: every process feeds its shard (`make_eval_iterator(process_index=...)`) into the
global batch with `jax.make_array_from_process_local_data`; reductions come back identical on
every process, and each process writes the images of its own rows.

Evaluators (`fid.FidEvaluator`, `segmentation.SegmentationEvaluator`) implement:

    name: str
    device_params() -> pytree                   # replicated on the mesh (network weights)
    device_fn(params, images_u8, batch) -> dict  # traced inside the per-batch jit
    update(outputs: dict[str, np.ndarray]) -> None   # host: accumulate (float64 / int64)
    result() -> dict[str, Any]

and, with `staged = True`, `host_stage(images_u8_local, local_batch) -> dict` and
`staged_fn(params, inputs, batch)` for networks whose official preprocessing needs PIL on the
host (the runner then calls a second jit on the prepared inputs; the scores still never leave
the device).

Compiled once per process: the per-batch function (and the staged ones) are kept in a small cache
keyed by everything that changes the program (`program_key`: the image source's and each
evaluator's key, e.g. the generator's and the networks' `GraphDef`s, and the mesh); weights are
arguments, never constants of the trace, so evaluating another checkpoint of the same model, as
the trainer's periodic evaluation does, runs the compiled program again (jit's own cache handles
other batch shapes). An evaluator without a `program_key` is keyed by its identity.

The evaluators of a run are built by `clade_jax.evaluation.evaluate.build_evaluators`; the trainer
builds them once and hands them in (evaluation never imports the training loop).
"""

from __future__ import annotations

import logging as std_logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clade_jax.training import runtime

log = std_logging.getLogger("clade_jax.evaluation")

# Batch entries a device function may read (the rest, e.g. names, stay on the host).
DEVICE_KEYS = ("label", "image", "instance", "icpe", "index", "valid")


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The training layout: a 1-D data-parallel mesh over every device of every process."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def to_uint8(images: jax.Array) -> jax.Array:
    """Generator output in [-1, 1] -> uint8 on device: `clade_jax.inference.to_uint8`'s rule
    (the official `tensor2im`, truncated), the same bytes as the saved PNGs."""
    from clade_jax.inference import to_uint8_device

    return to_uint8_device(images, "truncate")


def float_to_uint8(images: jax.Array) -> jax.Array:
    """The pipeline's float images (x / 127.5 - 1 of uint8) back to their uint8 values, on device
    (`inference.to_uint8(..., "nearest")`, as `segmentation.images_to_uint8`); uint8 passes."""
    from clade_jax.inference import to_uint8_device

    return to_uint8_device(images, "nearest")


def program_key(obj: Any) -> Hashable:
    """What identifies the traced program of a source, evaluator or function: its
    `program_key` attribute, else the object itself (by identity when it does not hash)."""
    key = getattr(obj, "program_key", None)
    if key is not None:
        return key
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return obj


class ImageSource:
    """Where a pass's uint8 images come from: `fn(params, batch) -> (images (B, H, W, 3) uint8,
    bad (B,) bool)` traced inside the per-batch jit; `bad` flags rows with NaN / inf.

    `program_key`: hashable, equal for sources whose `fn` traces to the same program for the same
    parameter shapes (default: `fn` itself)."""

    def __init__(self, fn: Callable, params: Any, description: str, program_key=None):
        self.fn, self.params, self.description = fn, params, description
        self.program_key = fn if program_key is None else program_key


def generator_source(net: Any, seed: int = 0) -> ImageSource:
    """Synthesis with an `InferenceModel` (its jit-compiled generator + VAE encoder).

    VAE models draw z from the encoder's posterior of the real image with the key
    `fold_in(key(seed), example index)`, so images do not depend on the batch size or layout.
    """
    try:
        run, g_state, e_state = net._run, net._g_state, net._e_state
        graphdefs = net._graphdefs
    except AttributeError as e:  # pragma: no cover - the InferenceModel's layout changed
        raise TypeError(f"{type(net).__name__} is not an InferenceModel") from e
    use_vae = bool(net.use_vae)
    use_instance, use_icpe = bool(net.use_instance), bool(net.use_icpe)

    def fn(params, batch):
        keys = None
        if use_vae:  # the seed is an argument: another seed runs the same program
            base_key = jax.random.key(params["seed"])
            keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
                jnp.maximum(batch["index"], 0)
            )
        fake = run(
            params["g"],
            params["e"],
            batch["label"],
            batch.get("instance") if use_instance else None,
            batch.get("icpe") if use_icpe else None,
            batch["image"] if use_vae else None,
            keys,
        )
        bad = ~jnp.isfinite(fake).all(axis=(1, 2, 3))
        return to_uint8(fake), bad

    # The program depends on the networks' structure (GraphDefs: architecture, dtypes, shapes of
    # the weights are in the parameters) and the flags; not on the weights or the seed.
    key = ("generator", graphdefs, int(net.z_dim), use_vae, use_instance, use_icpe)
    params = {"g": g_state, "e": e_state, "seed": np.asarray(seed, np.uint32)}
    return ImageSource(fn, params, "generator", key)


def real_source() -> ImageSource:
    """The batch's own (real) images as uint8."""

    def fn(params, batch):
        del params
        images = float_to_uint8(batch["image"])
        return images, jnp.zeros(images.shape[:1], bool)

    return ImageSource(fn, {}, "real images", "real images")


# Compiled per-batch functions: program key -> (step jit, {evaluator name: staged jit}); the few
# most recent (a training run's periodic evaluation and its reference pass need two).
_PROGRAMS: OrderedDict = OrderedDict()
MAX_PROGRAMS = 8


def clear_programs() -> None:
    """Forgets the compiled evaluation programs (the next pass traces and compiles again)."""
    _PROGRAMS.clear()


class _Programs:
    """The compiled functions of one program key. They reach the source and the evaluators
    through `current` (set by each Runner that uses them), so a cached program does not keep
    an earlier pass's objects (and their networks' weights) alive; a retrace (another batch
    shape) uses the current ones, which have the same key, so the same program."""

    def __init__(self, mesh: Mesh, staged_names: Sequence[str]):
        replicated = NamedSharding(mesh, P())
        batch_sharding = NamedSharding(mesh, P("data"))
        self.current: dict[str, Any] = {}
        current = self.current

        def evaluation_step(params, batch):
            images, bad = current["source"].fn(params["source"], batch)
            valid = batch["valid"]
            evals = {
                ev.name: ev.device_fn(params[ev.name], images, batch) for ev in current["direct"]
            }
            return {"valid": valid, "bad": bad & valid, "evals": evals}, images

        def staged(name: str) -> Callable:
            def staged_step(params, inputs, batch):
                return current["staged"][name].staged_fn(params, inputs, batch)

            return jax.jit(staged_step, out_shardings=replicated)

        self.step = jax.jit(evaluation_step, out_shardings=(replicated, batch_sharding))
        self.staged_fns = {name: staged(name) for name in staged_names}

    def use(self, source: ImageSource, direct: list, staged: list) -> None:
        self.current.update(source=source, direct=direct, staged={ev.name: ev for ev in staged})

    def release(self) -> None:
        self.current.clear()


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's numpy batch -> global arrays sharded along the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
        if k in DEVICE_KEYS and v is not None
    }


def _local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """The rows of a batch-sharded global array that belong to this process, in local order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P("data")))


class Runner:
    """One evaluation pass: the per-batch jit over `mesh` and the host loop around it.

    Args:
      source: where the images come from (`generator_source`, `real_source`).
      evaluators: the evaluators to run on the images.
      mesh: the data-parallel mesh (default `make_mesh()`).
      return_images: also bring the uint8 images of this process's rows to the host (to write
        them); otherwise they never leave the device.
    """

    def __init__(
        self,
        source: ImageSource,
        evaluators: Sequence[Any],
        *,
        mesh: Mesh | None = None,
        return_images: bool = False,
    ):
        self.source, self.evaluators = source, list(evaluators)
        self.mesh = make_mesh() if mesh is None else mesh
        self.return_images = return_images
        names = [ev.name for ev in self.evaluators]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluator names must be unique, got {names}")
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self._direct = [ev for ev in self.evaluators if not getattr(ev, "staged", False)]
        self._staged = [ev for ev in self.evaluators if getattr(ev, "staged", False)]
        params = {"source": source.params}
        params.update({ev.name: ev.device_params() for ev in self.evaluators})
        if jax.process_count() > 1:  # the same host values on every process -> global arrays
            params = jax.tree.map(np.asarray, params)
        self.params = jax.device_put(params, replicated)
        self.program_key = (
            program_key(source),
            tuple((ev.name, program_key(ev)) for ev in self._direct),
            tuple((ev.name, program_key(ev)) for ev in self._staged),
            self.mesh,
        )
        programs = _PROGRAMS.pop(self.program_key, None)
        if programs is None:
            programs = _Programs(self.mesh, [ev.name for ev in self._staged])
        _PROGRAMS[self.program_key] = programs  # the most recent last
        while len(_PROGRAMS) > MAX_PROGRAMS:
            _PROGRAMS.popitem(last=False)
        self._programs = programs
        self._companions: list[Runner] = []

    def run(
        self,
        batches: Iterable[dict],
        *,
        count: int,
        on_images: Callable[[np.ndarray, dict], None] | None = None,
        progress_every_s: float = 10.0,
        what: str = "images",
        companions: Sequence[Runner] = (),
    ) -> int:
        """Evaluates the first `count` examples of `batches`.

        Args:
          batches: this process's batches of an evaluation iterator (`mask`, `index` (B,)).
          count: examples to evaluate (index < count); the pass stops once the global batch has
            passed them.
          on_images: called with (this process's uint8 images, local batch, with `valid`) per
            batch when `return_images`.
          progress_every_s: off a terminal, a progress line (count, images/s, ETA) at most
            this often, and one at the end; on a terminal a progress bar (`runtime.Progress`).
          what: name of the images in the progress lines.
          companions: other runners on the same mesh fed the same batches in this pass (each
            batch read and transferred once; each runner runs its own compiled program on it,
            the same one as in a pass of its own, and its evaluators accumulate as there), e.g.
            the FID reference features of the evaluated examples' real images. Without staged
            evaluators or returned images.

        Returns:
          The number of examples evaluated (over all processes).
        """
        for c in companions:
            if c._staged or c.return_images or c.mesh != self.mesh:
                raise ValueError(
                    "a companion runner needs this mesh, no staged evaluators and "
                    "no returned images"
                )
        self._companions = list(companions)
        runners = [self, *self._companions]
        for r in runners:
            for ev in r.evaluators:  # evaluators handed in again start from zero
                if hasattr(ev, "reset"):
                    ev.reset()
            r._programs.use(r.source, r._direct, r._staged)
        try:
            with runtime.Progress(
                count, what, unit="image", every_s=progress_every_s, logger=log
            ) as progress:
                seen = self._loop(batches, count, on_images, progress)
                progress.log(seen)  # the closing line: count and rate
        finally:
            for r in runners:
                r._programs.release()
            self._companions = []
        if seen != count:
            raise RuntimeError(f"evaluated {seen} {what}, expected {count}")
        return seen

    def _loop(self, batches, count, on_images, progress) -> int:
        """The host loop, one batch ahead of the device: batch b + 1 is read, checked and
        dispatched before the results of batch b are fetched (jit dispatch is asynchronous), so
        the host's work (the next batch's decoding and transfer, PNG writes, the statistics)
        overlaps the device's. A batch is dispatched ahead only while more are needed: the
        evaluation iterators fill global batch b with examples [b * rows, (b + 1) * rows), so
        the one holding example `count - 1` is the last; with another layout the loop just
        fetches before reading on (the same decision on every process: it uses only global
        shapes and counts)."""
        seen, pending = 0, None
        for b, local in enumerate(batches):
            current = self._dispatch(b, local, count)
            if pending is not None:  # kept in flight: it could not reach `count` (see above)
                seen += self._finish(pending, on_images, progress)
                pending = None
            self._stage(current)
            if (b + 1) * current["rows"] < count:  # more batches needed: keep this one in flight
                pending = current
                continue
            seen += self._finish(current, on_images, progress)
            if seen >= count:
                return seen
        if pending is not None:
            seen += self._finish(pending, on_images, progress)
        return seen

    def _dispatch(self, b: int, local: dict, count: int) -> dict:
        """Host checks of batch b, its transfer and the (asynchronous) per-batch jit."""
        local = dict(local)
        index = np.asarray(local["index"])
        local["valid"] = np.asarray(local["mask"], bool) & (index >= 0) & (index < count)
        if "image" in local and np.asarray(local["image"]).dtype != np.uint8:
            local["image"] = np.asarray(local["image"], np.float32)
        for ev in [ev for r in (self, *self._companions) for ev in r.evaluators]:
            if hasattr(ev, "check_batch"):  # e.g. labels outside the segmenter's classes
                ev.check_batch(local)
        batch = shard_batch(local, self.batch_sharding)
        out, images = self._programs.step(self.params, batch)
        side = [c._programs.step(c.params, batch)[0] for c in self._companions]
        rows = int(batch["valid"].shape[0])  # the global batch
        return {
            "b": b, "local": local, "batch": batch, "out": out, "images": images, "rows": rows,
            "companions": side,
        }  # fmt: skip

    def _stage(self, p: dict) -> None:
        """The staged evaluators' host steps (they wait for the batch's images) and jits."""
        if not self._staged:
            return
        p["local_images"] = _local(p["images"], self.mesh)
        for ev in self._staged:
            inputs = {
                k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in ev.host_stage(p["local_images"], p["local"]).items()
            }
            p["out"]["evals"][ev.name] = self._programs.staged_fns[ev.name](
                self.params[ev.name], inputs, p["batch"]
            )

    def _finish(self, p: dict, on_images, progress) -> int:
        """Fetches a dispatched batch's results and hands them to the evaluators (and the
        images to `on_images`); returns its number of valid examples (all processes)."""
        out, side = jax.device_get((p["out"], p["companions"]))
        bad = np.asarray(out["bad"])
        if bad.any():
            raise FloatingPointError(
                f"the generator produced NaN/inf for {int(bad.sum())} example(s) of batch "
                f"{p['b']}: labels outside [0, num_classes) or a diverged checkpoint"
            )
        for runner, o in [(self, out), *zip(self._companions, side, strict=True)]:
            for ev in runner.evaluators:
                ev.update(o["evals"][ev.name])
        if self.return_images and on_images is not None:
            local_images = p.get("local_images")
            if local_images is None:
                local_images = _local(p["images"], self.mesh)
            on_images(local_images, p["local"])
        done = int(np.asarray(out["valid"]).sum())
        progress.update(done)
        return done
