"""Evaluate a run: synthesize a split, then FID, mIoU and pixel accuracy (`evaluate.py`).

    python evaluate.py --workdir=/runs/ade20k                       # latest checkpoint
    python evaluate.py --workdir=/runs/cityscapes --protocol=clade \
        --segmenter=drn_d_105 --segmenter_weights=drn-d-105_ms_cityscapes.pth

`evaluate(workdir, ...)` needs the workdir (its `config.json` and checkpoints; training workdirs
and those written by `python -m clade_jax.convert` alike) and the data of the split:

1. Restores the checkpoint (the latest by default; the EMA generator when the run kept one).
2. One pass over the split on every device of every process (`evaluators.common.Runner`): per
   batch one jit-compiled function synthesizes the images (VAE models: z from the encoder's
   posterior of the real image, keyed by `fold_in(key(seed), example index)`), runs Inception
   and the segmenter, and returns the pool features, the confusion-matrix counts and the uint8
   images. `max_images` > 0 keeps the first N examples; the padding of the last batch is masked
   on device. The function is compiled once per process: another checkpoint of the same model,
   another seed or another call with the same evaluators (`build_evaluators`, as the trainer's
   periodic evaluation passes them) runs the same compiled program (see `evaluators.common`).
   Progress: a bar with rate and ETA on a terminal, plain lines otherwise (`progress_every_s`).
3. Writes `workdir/eval/<step>/images/<name>.png` (each process its own examples; PNGs of an
   earlier evaluation of the step are removed first) and `workdir/eval/<step>/grid.png`.
4. FID against the protocol's reference set (`protocols`): `native` the real images of the same
   examples, `spade` / `oasis` the whole validation split, `clade` the training split resized
   bilinearly. Reference statistics are computed once and cached (by process 0) as
   `<fid_stats_dir>/<dataset>_<split>_<hash>[_bilinear]_n<count>_<H>x<W>.npz` (default folder
   `$CLADE_JAX_CACHE/fid_stats`, else `~/.cache/clade_jax/fid_stats`): for `native` in the
   synthesis pass (the reference pass's program on the same batches), otherwise in a pass of
   the reference images of their own, with its progress bar.
5. mIoU, pixel accuracy, mean class accuracy and frequency-weighted IoU of the segmenter on the
   synthesized images against the label maps (mapped to the segmenter's classes, don't-care
   ignored), and the same segmenter's scores on the real images as the reference. The segmenter:
   `segmenter=` (an object, a registry name or a paper segmenter name with
   `segmenter_weights=`), else the protocol's default (the paper segmenter of the data set for
   `clade` / `spade` / `oasis`, which then needs `segmenter_weights` or
   `config.eval.segmenter_weights`), else the builtin U-Net of `segmenter_workdir` /
   `config.eval.segmenter_workdir`; without one the segmentation numbers are skipped (logged).
6. Writes `workdir/eval/<step>.json` (process 0) and TensorBoard scalars and the grid into
   `workdir/eval`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from clade_jax.evaluation import registry, segmentation
from clade_jax.evaluation.evaluators import common
from clade_jax.evaluation.evaluators import fid as fid_eval
from clade_jax.evaluation.evaluators import segmentation as seg_eval

# Data-config fields that do not change the real validation images (left out of the FID cache key).
_NOT_IMAGE_FIELDS = (
    "num_workers",
    "read_threads",
    "prefetch_buffer",
    "shuffle_seed",
    "flip",
    "icpe",
    "use_instance",
    "include_portraits",
    "synthetic_size",
    "label_dir",
    "image_dir",
    "instance_dir",
    "val_instance_dir",
)


def default_fid_stats_dir() -> Path:
    """`$CLADE_JAX_CACHE/fid_stats`, else `~/.cache/clade_jax/fid_stats`."""
    from clade_jax.weights import cache_dir

    return cache_dir() / "fid_stats"


def fid_stats_stem(data_cfg: Any, split: str, stats_dir: str | os.PathLike | None = None) -> Path:
    """Path prefix of the cached real statistics of a split (before `_n<count>_<H>x<W>.npz`).

    Returns:
      `<stats_dir>/<dataset>_<split>_<hash of the image-defining data fields>`.
    """
    items = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
    fields = {k: v for k, v in items.items() if k not in _NOT_IMAGE_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    folder = Path(stats_dir) if stats_dir else default_fid_stats_dir()
    return folder / f"{data_cfg.dataset}_{split}_{digest[:10]}"


def get_protocol(name: str):
    """`protocols.get(name)` (the table of the papers' protocols)."""
    from clade_jax.evaluation import protocols

    return protocols.get(name)


def _file_name(name: str, index: int, used: set[str]) -> str:
    """A file name (without .png) for an example: its name made safe, unique in the folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or f"{index:07d}"
    if safe in used:
        safe = f"{safe}_{index:07d}"
    used.add(safe)
    return safe


def _jsonable(x: Any) -> Any:
    """NumPy scalars/arrays -> Python; NaN -> None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ----------------------------------------------------------------------------- segmenter


def resolve_segmenter(
    segmenter: Any,
    segmenter_workdir: str | None,
    config: Any,
    *,
    protocol: Any = None,
    segmenter_weights: Any = None,
) -> tuple[Any, str | None]:
    """The segmenter to score with, and a description of it for the JSON.

    Args:
      segmenter: a segmenter object, a registry name (`registry.get_segmenter`), a paper
        segmenter name ("upernet101" | "deeplabv2" | "drn_d_105", loaded from
        `segmenter_weights`), or None (the protocol's default).
      segmenter_workdir: workdir of the builtin segmenter; None: `config.eval.segmenter_workdir`.
      config: the run's config.
      protocol: a `protocols.Protocol` (None: native behaviour).
      segmenter_weights: the paper segmenter's published file(s); None:
        `config.eval.segmenter_weights`.

    Returns:
      (segmenter object or None, description or None).
    """
    eval_cfg = config.get("eval") or {}
    if segmenter_workdir is None:
        segmenter_workdir = eval_cfg.get("segmenter_workdir", "") or None
    if segmenter_weights is None:
        segmenter_weights = eval_cfg.get("segmenter_weights", "") or None
    if segmenter is None:
        segmenter = eval_cfg.get("segmenter", "") or None
    if segmenter is not None and not isinstance(segmenter, str):
        return segmenter, getattr(segmenter, "description", type(segmenter).__name__)
    from clade_jax.evaluation import protocols

    paper = protocols.PAPER_SEGMENTERS.get(config.data.dataset)
    if segmenter is None and protocol is not None and protocol.paper_segmenter:
        if paper is None:
            raise ValueError(
                f"eval.protocol {protocol.name!r} scores with the papers' segmenters, which "
                f"exist for {sorted(protocols.PAPER_SEGMENTERS)}, not {config.data.dataset!r}: "
                "use protocol 'native' with a builtin segmenter"
            )
        segmenter = paper
    if segmenter in ("upernet101", "deeplabv2", "drn_d_105"):
        from clade_jax.evaluation import segmenters

        if not segmenter_weights:
            raise ValueError(
                f"segmenter {segmenter!r} needs its published weights: pass "
                "--segmenter_weights (or set config.eval.segmenter_weights)"
            )
        if isinstance(segmenter_weights, str) and "," in segmenter_weights:
            segmenter_weights = segmenter_weights.split(",")
        seg = segmenters.load(segmenter, segmenter_weights)
        return seg, f"{segmenter}:{segmenter_weights}"
    name = segmenter or ("builtin" if segmenter_workdir else None)
    if name is None:
        return None, None
    kwargs = {"workdir": segmenter_workdir} if name == "builtin" and segmenter_workdir else {}
    seg = registry.get_segmenter(name, **kwargs)
    seg_config = getattr(seg, "config", None)
    if seg_config is not None:
        theirs, ours = seg_config.data.dataset, config.data.dataset
        if theirs != ours or seg_config.data.num_classes != config.data.num_classes:
            raise ValueError(
                f"segmenter in {segmenter_workdir} was trained on {theirs} "
                f"({seg_config.data.num_classes} classes) but the run uses {ours} "
                f"({config.data.num_classes} classes)"
            )
    return seg, f"{name}:{segmenter_workdir}" if kwargs else name


def segmentation_evaluator(
    seg: Any,
    description: str,
    config: Any,
    protocol: Any,
    pixel_accuracy: str | None = None,
    segmenter_size: Any = None,
) -> seg_eval.SegmentationEvaluator:
    """The segmentation evaluator of a segmenter for the run's data and protocol
    (`pixel_accuracy`: "labeled" | "all", None: the protocol's; `segmenter_size`: (h, w) the
    images are resized to for the segmenter, None: the output size)."""
    from clade_jax.evaluation import protocols

    data = config.data
    device_seg = seg_eval.device_segmenter(seg, multiscale=bool(protocol and protocol.multiscale))
    k = device_seg.num_classes
    dontcare = int(data.get("dontcare_label", -1))
    dontcare = dontcare if dontcare >= 0 else None
    seg_name = getattr(seg, "name", None) or (description or "").split(":", 1)[0]
    mapping = protocols.label_mapping(data.dataset, seg_name, int(data.num_classes))
    if mapping is None and k > int(data.num_classes):
        raise ValueError(
            f"segmenter {description} predicts {k} classes but {data.dataset} has "
            f"{data.num_classes} (config.data.num_classes): wrong segmenter for this data set"
        )
    table = seg_eval.label_table(int(data.num_classes), k, dontcare=dontcare, mapping=mapping)
    what = f"{data.dataset} (protocol {protocol.name if protocol else 'native'})"
    return seg_eval.SegmentationEvaluator(
        device_seg,
        table,
        metric_ignore=dontcare if dontcare is not None and dontcare < k else None,
        what=what,
        pixel_accuracy=pixel_accuracy or (protocol.pixel_accuracy if protocol else "labeled"),
        input_size=segmenter_size,
    )


# ----------------------------------------------------------------------------- FID reference


def reference_batches(data: Any, split: str, batch_size: int, resize: str) -> Iterator[dict]:
    """This process's batches of the real images of a split for FID (uint8, `mask`, `index`).

    `resize="pipeline"`: `make_eval_iterator`'s images (PIL bicubic to the output size);
    `"bilinear"`: the original files resized with PIL bilinear to the output size (CLADE's
    `fid_score.py`).
    """
    from clade_jax.data import make_eval_iterator, make_source
    from clade_jax.data.transforms import AugmentOptions, eval_geometry

    pi, pc = jax.process_index(), jax.process_count()
    if resize == "pipeline":
        yield from make_eval_iterator(
            data, batch_size=batch_size, split=split, process_index=pi, process_count=pc
        )
        return
    if resize != "bilinear":
        raise ValueError(f"unknown FID resize {resize!r}")
    source = make_source(data, split)
    opts = AugmentOptions.from_config(data)
    n = len(source)
    padded = math.ceil(n / batch_size) * batch_size
    local = list(range(padded))[pi::pc]
    per = batch_size // pc

    def load(i: int) -> np.ndarray:
        image = source[i % n]["image"]
        g = eval_geometry(image.shape[:2], opts)
        if image.shape[:2] != tuple(g.resize):
            image = Image.fromarray(image).resize((g.resize[1], g.resize[0]), Image.BILINEAR)
            image = np.asarray(image)
        if g.crop is not None:
            top, left, h, w = g.crop
            image = image[top : top + h, left : left + w]
        return image

    for start in range(0, len(local), per):
        idx = np.asarray(local[start : start + per])
        yield {
            "image": np.stack([load(int(i)) for i in idx]),
            "mask": idx < n,
            "index": np.where(idx < n, idx, -1).astype(np.int32),
        }


def reference_path(data: Any, protocol: Any, split: str, count: int, resolution, stats_dir):
    """(cache file of the protocol's FID reference statistics, reference split, its count)."""
    from clade_jax.data import make_source

    ref_split = protocol.fid_split or split
    ref_count = len(make_source(data, ref_split)) if protocol.fid_all else count
    stem = fid_stats_stem(data, ref_split, stats_dir)
    if protocol.fid_resize != "pipeline":
        stem = stem.with_name(f"{stem.name}_{protocol.fid_resize}")
    return fid_lib_statistics_path(stem, ref_count, resolution), ref_split, ref_count


def _cached(path: Path) -> bool:
    """Whether the cache file exists, decided by process 0 for all (they run passes together)."""
    exists = path.is_file()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    return exists


def reference_statistics(
    data: Any,
    protocol: Any,
    split: str,
    count: int,
    resolution: tuple[int, int],
    *,
    features: tuple[Callable, Any],
    batch_size: int,
    mesh: Any,
    stats_dir: Any,
    progress_every_s: float = 10.0,
) -> tuple[np.ndarray, np.ndarray, Path]:
    """(mu, sigma, cache path) of the protocol's FID reference set: cached, else one pass of
    the reference images through the runner (then cached by process 0)."""
    path, ref_split, ref_count = reference_path(data, protocol, split, count, resolution, stats_dir)
    if _cached(path):
        mu, sigma = fid_eval.load_statistics(path, ref_count, resolution)
        return mu, sigma, path
    logging.info("real FID statistics: %s (computing over %d images)", path, ref_count)
    ev = fid_eval.FidEvaluator(features)
    runner = common.Runner(common.real_source(), [ev], mesh=mesh)
    batches = reference_batches(data, ref_split, batch_size, protocol.fid_resize)
    runner.run(
        batches, count=ref_count, what=f"FID reference ({ref_split})",
        progress_every_s=progress_every_s,
    )  # fmt: skip
    stats = ev.result()
    if jax.process_index() == 0:
        fid_eval.save_statistics(path, stats["mu"], stats["sigma"], ref_count, resolution)
    return stats["mu"], stats["sigma"], path


def fid_lib_statistics_path(stem: Path, count: int, resolution) -> Path:
    from clade_jax.evaluation import fid as fid_lib

    return fid_lib.statistics_path(stem, count, resolution)


# ----------------------------------------------------------------------------- outputs


class _ImageWriter:
    """Writes each valid example's PNG (this process's rows) and keeps the grid's first rows."""

    def __init__(self, images_dir: Path, num_grid: int):
        self.images_dir, self.num_grid = images_dir, num_grid
        self.used: set[str] = set()
        self.seen: set[int] = set()
        self.grid: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, images: np.ndarray, local: dict) -> None:
        names, index = local["name"], np.asarray(local["index"])
        for i in np.flatnonzero(local["valid"]):
            if int(index[i]) in self.seen:
                raise RuntimeError(f"example {index[i]} ({names[i]}) came twice")
            self.seen.add(int(index[i]))
            name = _file_name(str(names[i]), int(index[i]), self.used)
            Image.fromarray(images[i]).save(self.images_dir / f"{name}.png")
            if len(self.grid) < self.num_grid:
                real = segmentation.images_to_uint8(local["image"][i])
                self.grid.append((np.asarray(local["label"][i]), images[i], real))


def _write_tensorboard(logdir: Path, step: int, scalars: dict, images: dict) -> None:
    """Scalars and images into a TensorBoard run (`workdir/eval`, process 0)."""
    from clade_jax.training.runtime import create_writer

    writer = create_writer(logdir)
    writer.write_scalars(step, scalars)
    writer.write_images(step, images)
    writer.flush()
    writer.close()


# ----------------------------------------------------------------------------- the driver

_MODEL_CACHE: dict = {}


def _load_model(workdir: str, step: int | None, use_ema: bool):
    """`load_inference_model`, reusing the last model loaded when the same checkpoint (same
    files: the key holds the config's and the step folder's modification times) is evaluated
    again, e.g. with other protocols or segmenters."""
    from clade_jax.inference import load_inference_model

    folder = Path(workdir) / "checkpoints"
    steps = (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    )
    resolved = step if step is not None else (steps[-1] if steps else None)
    stamp = lambda p: p.stat().st_mtime_ns if p.exists() else None
    key = (
        os.path.realpath(workdir), resolved, use_ema,
        stamp(Path(workdir) / "config.json"), stamp(folder / str(resolved)),
    )  # fmt: skip
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = load_inference_model(workdir, step, use_ema=use_ema)
    return _MODEL_CACHE[key]


@dataclasses.dataclass
class Evaluators:
    """What `evaluate` scores with, built once by `build_evaluators` and reusable across calls
    (the trainer's periodic evaluation): the protocol, the FID feature function and the
    segmentation evaluator. Reusing them reuses their compiled programs and loaded weights.

    Attributes:
      protocol: a `protocols.Protocol`.
      features: the FID feature function pair `(fn, params)`, or None (no FID).
      segmentation: a `SegmentationEvaluator`, or None (no segmenter: mIoU skipped).
      segmenter: the segmenter's description for the JSON (None without one).
      fid_stats_dir: cache folder of the real statistics (None: `default_fid_stats_dir()`).
    """

    protocol: Any
    features: tuple[Callable, Any] | None
    segmentation: seg_eval.SegmentationEvaluator | None
    segmenter: str | None
    fid_stats_dir: Any = None


def build_evaluators(
    config: Any,
    *,
    protocol: str | None = None,
    segmenter_workdir: str | None = None,
    segmenter: Any = None,
    segmenter_weights: Any = None,
    fid_stats_dir: str | os.PathLike | None = None,
    compute_fid: bool = True,
    inception: Any = None,
    pixel_accuracy: str | None = None,
    segmenter_size: Any = None,
) -> Evaluators:
    """The evaluators of a run's config (arguments as `evaluate`'s; None: the config's)."""
    eval_cfg = config.get("eval") or {}
    proto = get_protocol(protocol or eval_cfg.get("protocol", "native") or "native")
    features = _feature_function(inception, fid_stats_dir) if compute_fid else None
    seg, seg_name = resolve_segmenter(
        segmenter, segmenter_workdir, config, protocol=proto, segmenter_weights=segmenter_weights
    )
    if seg is None:
        logging.info("no segmenter (see --segmenter / --segmenter_workdir): skipping mIoU")
    seg_ev = None
    if seg is not None:
        seg_ev = segmentation_evaluator(
            seg, seg_name, config, proto, pixel_accuracy, segmenter_size
        )
    return Evaluators(proto, features, seg_ev, seg_name, fid_stats_dir)


def evaluate(
    workdir: str,
    *,
    step: int | None = None,
    split: str | None = None,
    protocol: str | None = None,
    segmenter_workdir: str | None = None,
    segmenter: Any = None,
    segmenter_weights: Any = None,
    max_images: int | None = None,
    batch_size: int | None = None,
    fid_stats_dir: str | os.PathLike | None = None,
    compute_fid: bool = True,
    inception: Any = None,
    pixel_accuracy: str | None = None,
    segmenter_size: Any = None,
    evaluators: Evaluators | None = None,
    use_ema: bool = True,
    seed: int = 0,
    num_grid: int = 8,
    progress_every_s: float = 10.0,
    mesh: Any = None,
) -> dict[str, Any]:
    """Synthesize a split and score it (see the module docstring).

    Args:
      workdir: training or converted workdir.
      step: checkpoint step (default: the latest).
      split: data split (default `config.eval.split`, else "validation").
      protocol: "clade" | "spade" | "oasis" | "native" (default `config.eval.protocol`, else
        "native"); see `protocols`.
      segmenter_workdir: builtin segmenter's workdir (default `config.eval.segmenter_workdir`).
      segmenter: a segmenter object, registry name or paper segmenter name.
      segmenter_weights: the paper segmenter's published file(s) (a path, a list, or paths
        separated by commas; default `config.eval.segmenter_weights`).
      max_images: > 0 evaluates the first N examples; 0 all; None `config.eval.max_images`.
      batch_size: global batch (default `config.eval.batch_size`), rounded up to a multiple of
        the device count.
      fid_stats_dir: cache folder of the real statistics (default `default_fid_stats_dir()`).
      compute_fid: False skips FID (and the Inception network).
      inception: None (pytorch-fid's Inception), a device feature function pair
        `(fn(params, images_u8) -> (B, D), params)`, or a NumPy extractor uint8 (N, H, W, 3) ->
        (N, D) (called back from the device); another extractor needs its own `fid_stats_dir`.
      pixel_accuracy: "labeled" | "all": which pixel accuracy is "pixel_accuracy" (both are
        reported); None: the protocol's (`protocols`).
      segmenter_size: (height, width) the synthesized and the real images are resized to (PIL
        bicubic) before the segmenter, e.g. (1024, 2048) for Cityscapes (`protocols`: SPADE's
        image size); the scores are still taken at the label size. None: the output size.
      evaluators: `build_evaluators(...)` built before (then `protocol`, `segmenter*`,
        `fid_stats_dir`, `compute_fid` and `inception` must be left unset): repeated
        evaluations reuse the loaded networks and the compiled programs.
      use_ema: use the EMA generator when the run kept one.
      seed: base seed of the VAE's latent codes.
      num_grid: examples in the grid image.
      progress_every_s: off a terminal, a progress line at most this often (on a terminal a
        progress bar).
      mesh: the device mesh (default: every device of every process).

    Returns:
      The dict written to `workdir/eval/<step>.json`: "step", "split", "protocol",
      "num_images", "resolution", "generator", "z", "fid", "fid_real_stats", "segmenter",
      "miou", "pixel_accuracy", "mean_accuracy", "fw_iou", "per_class_iou", "confusion",
      "pixel_accuracy_labeled", "pixel_accuracy_all", "real_miou", "real_pixel_accuracy",
      "images_dir", "grid", "seconds". Numbers that were not computed are None.
    """
    from clade_jax.data import make_eval_iterator, make_source
    from clade_jax.training.checkpoint import load_config

    start_time = time.time()
    # Everything that can be checked without the weights first.
    config = load_config(workdir)
    data, eval_cfg = config.data, config.get("eval") or {}
    if evaluators is None:
        evaluators = build_evaluators(
            config, protocol=protocol, segmenter_workdir=segmenter_workdir, segmenter=segmenter,
            segmenter_weights=segmenter_weights, fid_stats_dir=fid_stats_dir,
            compute_fid=compute_fid, inception=inception, pixel_accuracy=pixel_accuracy,
            segmenter_size=segmenter_size,
        )  # fmt: skip
    else:
        given = dict(
            protocol=protocol, segmenter_workdir=segmenter_workdir, segmenter=segmenter,
            segmenter_weights=segmenter_weights, fid_stats_dir=fid_stats_dir, inception=inception,
            pixel_accuracy=pixel_accuracy, segmenter_size=segmenter_size,
        )  # fmt: skip
        clash = sorted(k for k, v in given.items() if v is not None)
        if clash or not compute_fid:
            raise ValueError(
                f"evaluate(evaluators=...) already fixes {clash or ['compute_fid']}: pass them "
                "to build_evaluators instead"
            )
    proto, features, seg_ev = evaluators.protocol, evaluators.features, evaluators.segmentation
    fid_stats_dir = evaluators.fid_stats_dir
    split = split or eval_cfg.get("split", "validation")
    mesh = common.make_mesh() if mesh is None else mesh
    batch_size = math.ceil(int(batch_size or eval_cfg.get("batch_size", 16)) / mesh.size)
    batch_size *= mesh.size
    max_images = int(eval_cfg.get("max_images", 0) if max_images is None else max_images)
    total = len(make_source(data, split))
    count = min(total, max_images) if max_images > 0 else total
    if count < 1 or (features is not None and count < 2):
        raise ValueError(f"split {split!r} of {data.dataset}: {count} examples (FID needs 2)")
    fid_ev = fid_eval.FidEvaluator(features) if features is not None else None

    config, net, step = _load_model(workdir, step, use_ema)
    resolution = tuple(int(s) for s in net.output_size)
    images_dir = _fresh_images_dir(Path(workdir) / "eval" / str(step) / "images")
    logging.info(
        "evaluating %s step %d on %s/%s (protocol %s): %d images, batch %d on %d devices",
        workdir, step, data.dataset, split, proto.name, count, batch_size, mesh.size,
    )  # fmt: skip
    writer = _ImageWriter(images_dir, num_grid)
    runner = common.Runner(
        common.generator_source(net, seed),
        [ev for ev in (seg_ev, fid_ev) if ev is not None],
        mesh=mesh,
        return_images=True,
    )
    # The reference = the evaluated examples' real images (`native`), not cached yet: their
    # features are taken in this pass by the reference pass's own program (a companion runner:
    # the batches are read and transferred once; the synthesis program stays the same whether
    # the statistics are cached or not, so a later evaluation compiles nothing).
    ref_ev, companions = None, []
    if fid_ev is not None and proto.same_examples(split):
        ref_path, _, _ = reference_path(data, proto, split, count, resolution, fid_stats_dir)
        if not _cached(ref_path):
            logging.info("real FID statistics: %s (in the synthesis pass)", ref_path)
            ref_ev = fid_eval.FidEvaluator(features)
            companions = [common.Runner(common.real_source(), [ref_ev], mesh=mesh)]
    pi, pc = jax.process_index(), jax.process_count()
    batches = make_eval_iterator(
        data, batch_size=batch_size, split=split, process_index=pi, process_count=pc
    )
    runner.run(
        batches, count=count, on_images=writer, progress_every_s=progress_every_s,
        what=f"evaluation step {step}", companions=companions,
    )  # fmt: skip

    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    result.update(
        workdir=str(workdir), step=int(step), split=split, dataset=data.dataset,
        protocol=proto.name, num_images=count, resolution=list(resolution),
        generator="ema" if (float(config.get("ema_decay", 0.0)) > 0 and use_ema) else "generator",
        z=f"posterior of the real image (reparameterize), seed {seed}" if net.use_vae else None,
        segmenter=evaluators.segmenter if seg_ev is not None else None,
        images_dir=str(images_dir),
    )  # fmt: skip
    if ref_ev is not None:
        ref = ref_ev.result()
        if jax.process_index() == 0:
            fid_eval.save_statistics(ref_path, ref["mu"], ref["sigma"], count, resolution)
        result.update(fid=_fid(fid_ev.result(), ref["mu"], ref["sigma"]))
        result.update(fid_real_stats=str(ref_path))
    elif fid_ev is not None:
        # The protocol's reference set (cached, or a pass of its own, then cached).
        mu, sigma, ref_path = reference_statistics(
            data, proto, split, count, resolution, features=features,
            batch_size=batch_size, mesh=mesh, stats_dir=fid_stats_dir,
            progress_every_s=progress_every_s,
        )  # fmt: skip
        result.update(fid=_fid(fid_ev.result(), mu, sigma), fid_real_stats=str(ref_path))
    if seg_ev is not None:
        result.update({k: v for k, v in seg_ev.result().items() if k in RESULT_KEYS})
    for key in ("fid", "miou", "pixel_accuracy"):
        if result[key] is not None and not math.isfinite(result[key]):
            raise FloatingPointError(f"{key} became {result[key]} (step {step}, {count} images)")
    return _write_outputs(result, writer.grid, config, workdir, start_time)


RESULT_KEYS = (
    "workdir", "step", "split", "dataset", "protocol", "num_images", "resolution", "generator",
    "z", "fid", "fid_real_stats", "segmenter", "miou", "pixel_accuracy", "mean_accuracy",
    "fw_iou", "per_class_iou", "confusion", "pixel_accuracy_labeled", "pixel_accuracy_all",
    "real_miou", "real_pixel_accuracy", "images_dir",
    "grid", "seconds",
)  # fmt: skip


def _feature_function(inception: Any, fid_stats_dir: Any) -> tuple[Callable, Any]:
    """The FID feature function pair for `evaluate(inception=...)`."""
    from clade_jax.evaluation import fid as fid_lib

    if inception is None:
        return fid_eval.inception_features()
    if not fid_stats_dir and not isinstance(inception, fid_lib.InceptionFeatures):
        raise ValueError(
            "a custom feature extractor needs its own fid_stats_dir: the default cache holds "
            "statistics of pytorch-fid's Inception features"
        )
    if isinstance(inception, tuple):
        return inception
    probe = np.asarray(inception(np.zeros((2, 8, 8, 3), np.uint8)))  # the feature size
    return fid_eval.host_features(inception, probe.shape[-1])


def _fid(fake: dict, mu: np.ndarray, sigma: np.ndarray) -> float:
    from clade_jax.evaluation import fid as fid_lib

    if fake["count"] < 2048:
        logging.warning(
            "FID of %d images (< 2048, the feature size): the covariances are singular and "
            "the value is biased upwards; compare only numbers over the same image count",
            fake["count"],
        )
    return fid_lib.frechet_distance(fake["mu"], fake["sigma"], mu, sigma)


def _fresh_images_dir(images_dir: Path) -> Path:
    """The images folder, emptied of an earlier evaluation's PNGs by process 0 (all wait)."""
    if jax.process_index() == 0:
        images_dir.mkdir(parents=True, exist_ok=True)
        for stale in images_dir.glob("*.png"):
            stale.unlink()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("clade_jax evaluate: images folder ready")
    return images_dir


def _write_outputs(result: dict, grid_rows: list, config: Any, workdir: str, start: float):
    """The grid PNG, `eval/<step>.json` and the TensorBoard scalars (process 0); the result."""
    step, split = result["step"], result["split"]
    out_dir = Path(workdir) / "eval" / str(step)
    grid = None
    if grid_rows:
        from clade_jax.visualize import image_grid

        labels, fakes, reals = (np.stack(x) for x in zip(*grid_rows, strict=True))
        grid = image_grid(labels, fakes, reals, int(config.data.num_classes))
        result["grid"] = str(out_dir / "grid.png")
    result["seconds"] = round(time.time() - start, 2)
    result = _jsonable(result)
    if jax.process_index() == 0:
        if grid is not None:
            Image.fromarray(grid).save(out_dir / "grid.png")
        json_path = Path(workdir) / "eval" / f"{step}.json"
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, json_path)
        keys = ("fid", "miou", "pixel_accuracy", "real_miou", "real_pixel_accuracy")
        scalars = {f"{split}/{k}": result[k] for k in keys if result[k] is not None}
        images = {f"{split}/grid": grid} if grid is not None else {}
        _write_tensorboard(Path(workdir) / "eval", step, scalars, images)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        logging.info("step %d: %s -> %s", step, summary or "no scores", json_path)
    return result
