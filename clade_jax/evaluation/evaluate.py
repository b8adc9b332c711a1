"""Evaluate a run: synthesize a whole split, then FID, mIoU and pixel accuracy (`evaluate.py`).

    python evaluate.py --workdir=/runs/ade20k                       # latest checkpoint
    python evaluate.py --workdir=/runs/ade20k --step=20000 --segmenter_workdir=/runs/seg

`evaluate(workdir, ...)` needs only the workdir (its `config.json` and checkpoints; training
workdirs and those written by `python -m clade_jax.convert` alike) and the data of the split:

1. Restores the checkpoint (the latest by default; the EMA generator when the run kept one) in
   evaluation mode (BatchNorm running statistics, stored spectral-norm vectors).
2. Synthesizes every example of the split exactly once, in order (`make_eval_iterator`; the
   padding of the last batch is dropped; `config.eval.max_images` / `max_images` > 0 keeps the
   first N). VAE models synthesize with z drawn from the encoder's posterior of the *real* image
   (style-guided, as the official test does with `use_vae`: `z = reparameterize(E(real))`), with
   the key `fold_in(PRNGKey(seed), example index)`, so the numbers do not depend on the batch size.
3. Writes `workdir/eval/<step>/images/<name>.png` (uint8 as the official `tensor2im`; PNGs left
   there by an earlier evaluation of the step are removed first) and
   `workdir/eval/<step>/grid.png` (rows of label | synthesized | real for the first examples).
4. FID between the synthesized images and the real images of the same examples (pytorch-fid's
   Inception, `clade_jax.evaluation.fid`). The real statistics are computed once and cached as
   `<fid_stats_dir>/<dataset>_<split>_<hash>_n<count>_<H>x<W>.npz`; the hash covers the data
   config fields that change the real images (root, sizes, preprocessing, ...), count and
   resolution are in the name. Default folder: `$CLADE_JAX_CACHE/fid_stats`, else
   `~/.cache/clade_jax/fid_stats`.
5. mIoU, pixel accuracy (and mean class accuracy, frequency-weighted IoU) of a segmenter run on
   the synthesized images against the input label maps, the don't-care class ignored; the same
   segmenter's scores on the real images are reported beside them as the reference. The
   segmenter is the one given, else the builtin one of `segmenter_workdir` /
   `config.eval.segmenter_workdir`; without one these numbers are skipped (logged).
6. Writes `workdir/eval/<step>.json` (every number and what was used) and TensorBoard scalars and
   the grid into `workdir/eval` (a separate TensorBoard run beside the training one).

Single process: the whole split is synthesized by process 0 on one device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from clade_jax.evaluation import registry, segmentation

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

    Args:
      data_cfg: `config.data`.
      split: the split.
      stats_dir: the cache folder (default `default_fid_stats_dir()`).

    Returns:
      `<stats_dir>/<dataset>_<split>_<hash of the image-defining data fields>`.
    """
    items = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
    fields = {k: v for k, v in items.items() if k not in _NOT_IMAGE_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    folder = Path(stats_dir) if stats_dir else default_fid_stats_dir()
    return folder / f"{data_cfg.dataset}_{split}_{digest[:10]}"


def _file_name(name: str, index: int, used: set[str]) -> str:
    """A file name (without .png) for an example: its name made safe, unique in the folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or f"{index:07d}"
    if safe in used:
        safe = f"{safe}_{index:07d}"
    used.add(safe)
    return safe


class _FixedBatch:
    """Calls `fn` on inputs padded to `size` rows (one compiled shape) and drops the padding."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], size: int):
        self.fn, self.size = fn, size

    def __call__(self, x: np.ndarray) -> np.ndarray:
        outs = []
        for start in range(0, len(x), self.size):
            chunk = x[start : start + self.size]
            real = len(chunk)
            if real < self.size:
                pad = np.repeat(chunk[-1:], self.size - real, axis=0)
                chunk = np.concatenate([chunk, pad])
            outs.append(np.asarray(self.fn(chunk))[:real])
        return np.concatenate(outs)


def resolve_segmenter(
    segmenter: Any, segmenter_workdir: str | None, config: Any
) -> tuple[segmentation.Segmenter | None, str | None]:
    """The segmenter to score with, and a description of it for the JSON.

    Args:
      segmenter: a `Segmenter`, a registry name (`registry.get_segmenter`), or None.
      segmenter_workdir: workdir of the builtin segmenter (passed as `workdir=` to a named one);
        None falls back to `config.eval.segmenter_workdir`.
      config: the run's config.

    Returns:
      (segmenter or None, description or None).
    """
    if segmenter_workdir is None:
        segmenter_workdir = (config.get("eval") or {}).get("segmenter_workdir", "") or None
    if segmenter is not None and not isinstance(segmenter, str):
        return segmenter, getattr(segmenter, "description", type(segmenter).__name__)
    name = segmenter or ("builtin" if segmenter_workdir else None)
    if name is None:
        return None, None
    kwargs = {"workdir": segmenter_workdir} if segmenter_workdir else {}
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
    return seg, f"{name}:{segmenter_workdir}" if segmenter_workdir else name


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


def evaluate(
    workdir: str,
    *,
    step: int | None = None,
    split: str | None = None,
    segmenter_workdir: str | None = None,
    segmenter: Any = None,
    max_images: int | None = None,
    batch_size: int | None = None,
    fid_stats_dir: str | os.PathLike | None = None,
    compute_fid: bool = True,
    inception: Callable[[np.ndarray], np.ndarray] | None = None,
    use_ema: bool = True,
    seed: int = 0,
    num_grid: int = 8,
    log_every: int = 10,
) -> dict[str, Any]:
    """Synthesize a split and score it (see the module docstring).

    Args:
      workdir: training or converted workdir.
      step: checkpoint step (default: the latest).
      split: data split (default `config.eval.split`, else "validation").
      segmenter_workdir: builtin segmenter's workdir (default `config.eval.segmenter_workdir`).
      segmenter: a `Segmenter` object or registry name; overrides the builtin one.
      max_images: > 0 evaluates the first N examples; 0 all; None `config.eval.max_images`.
      batch_size: synthesis batch (default `config.eval.batch_size`).
      fid_stats_dir: cache folder of the real statistics (default `default_fid_stats_dir()`).
      compute_fid: False skips FID (and the Inception network).
      inception: feature extractor uint8 (N, H, W, 3) -> (N, D) (default: pytorch-fid's
        Inception, `fid.InceptionFeatures`); another extractor needs its own `fid_stats_dir`.
      use_ema: use the EMA generator when the run kept one.
      seed: base seed of the VAE's latent codes.
      num_grid: examples in the grid image.
      log_every: progress line every this many batches.

    Returns:
      The dict written to `workdir/eval/<step>.json`: "step", "split", "num_images",
      "resolution", "generator" ("ema" or "generator"), "z" (how VAE codes were drawn, or None),
      "fid", "fid_real_stats", "segmenter", "miou", "pixel_accuracy", "mean_accuracy",
      "fw_iou", "per_class_iou", "real_miou", "real_pixel_accuracy", "images_dir", "grid",
      "seconds". Numbers that were not computed are None.
    """
    from clu import metric_writers

    from clade_jax.data import make_eval_iterator, make_source
    from clade_jax.evaluation import fid as fid_lib
    from clade_jax.inference import load_inference_model, to_uint8
    from clade_jax.visualize import image_grid

    start_time = time.time()
    custom = not isinstance(inception, (type(None), fid_lib.InceptionFeatures))
    if compute_fid and custom and not fid_stats_dir:
        raise ValueError(
            "a custom feature extractor needs its own fid_stats_dir: the default cache holds "
            "statistics of pytorch-fid's Inception features"
        )
    if jax.process_count() > 1:
        raise NotImplementedError("evaluate runs on one process; start it without --distributed")
    config, net, step = load_inference_model(workdir, step, use_ema=use_ema)
    has_ema = float(config.get("ema_decay", 0.0)) > 0
    eval_cfg = config.get("eval") or {}
    split = split or eval_cfg.get("split", "validation")
    batch_size = int(batch_size or eval_cfg.get("batch_size", 16))
    max_images = int(eval_cfg.get("max_images", 0) if max_images is None else max_images)
    data = config.data
    num_classes = int(data.num_classes)
    ignore = int(data.get("dontcare_label", -1))
    ignore = ignore if ignore >= 0 else None
    total = len(make_source(data, split))
    count = min(total, max_images) if max_images > 0 else total
    if count < 1:
        raise ValueError(f"split {split!r} of {data.dataset} has no examples")
    seg, seg_name = resolve_segmenter(segmenter, segmenter_workdir, config)
    if seg is None:
        logging.info(
            "no segmenter (pass --segmenter_workdir or set config.eval.segmenter_workdir): "
            "skipping mIoU and pixel accuracy"
        )
    if compute_fid and count < 2:
        raise ValueError("FID needs at least 2 images")
    extractor = None
    if compute_fid:
        if inception is None:
            inception = fid_lib.InceptionFeatures(batch_size=batch_size)
        extractor = _FixedBatch(inception, batch_size)

    out_dir = Path(workdir) / "eval" / str(step)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("*.png"):  # the folder holds exactly this evaluation's images
        stale.unlink()
    logging.info(
        "evaluating %s step %d on %s/%s: %d images, batch %d",
        workdir,
        step,
        data.dataset,
        split,
        count,
        batch_size,
    )
    iterator = make_eval_iterator(
        data, batch_size=batch_size, split=split, process_index=0, process_count=1
    )
    base_key = jax.random.key(seed)
    loop_start = time.time()
    fake_feats, grid_rows, seen, used = [], [], set(), set()
    conf = np.zeros((num_classes, num_classes), np.int64)
    conf_real = np.zeros_like(conf)
    resolution = None
    for b, batch in enumerate(iterator):
        names = batch.pop("name")
        index = np.asarray(batch["index"])
        keep = np.asarray(batch["mask"], bool) & (index < count)
        if not keep.any():
            break
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(np.maximum(index, 0))
        fake = net(
            batch["label"],
            instance=batch.get("instance"),
            icpe=batch.get("icpe"),
            style=batch["image"] if net.use_vae else None,
            keys=keys if net.use_vae else None,
        )
        if not np.isfinite(fake[keep]).all():
            bad = [
                str(n)
                for n, k, f in zip(names, keep, fake, strict=True)
                if k and not np.isfinite(f).all()
            ]
            raise FloatingPointError(
                f"the generator produced NaN/inf for {bad[:5]}: labels outside "
                f"[0, {num_classes}) or a diverged checkpoint"
            )
        fake_u8 = to_uint8(fake)
        resolution = tuple(fake_u8.shape[1:3])
        for i in np.flatnonzero(keep):
            if int(index[i]) in seen:
                raise RuntimeError(f"example {index[i]} ({names[i]}) came twice")
            seen.add(int(index[i]))
            name = _file_name(str(names[i]), int(index[i]), used)
            Image.fromarray(fake_u8[i]).save(images_dir / f"{name}.png")
        if len(grid_rows) < num_grid:
            for i in np.flatnonzero(keep)[: num_grid - len(grid_rows)]:
                grid_rows.append((batch["label"][i], fake[i], batch["image"][i]))
        if extractor is not None:
            fake_feats.append(extractor(fake_u8)[keep])
        if seg is not None:
            labels = np.asarray(batch["label"])
            size = labels.shape[1:3]
            pred = segmentation.predict_labels(seg, fake_u8, size)
            conf += segmentation.confusion_matrix(pred[keep], labels[keep], num_classes, ignore)
            real_u8 = segmentation.images_to_uint8(batch["image"])
            pred = segmentation.predict_labels(seg, real_u8, size)
            conf_real += segmentation.confusion_matrix(
                pred[keep], labels[keep], num_classes, ignore
            )
        if (b + 1) % log_every == 0 or len(seen) >= count:
            rate = len(seen) / max(time.time() - loop_start, 1e-9)
            logging.info("synthesized %d / %d images (%.1f images/s)", len(seen), count, rate)
        if len(seen) >= count:
            break
    if len(seen) != count:
        raise RuntimeError(f"synthesized {len(seen)} images, expected {count}")

    result: dict[str, Any] = {
        "workdir": str(workdir),
        "step": int(step),
        "split": split,
        "dataset": data.dataset,
        "num_images": count,
        "resolution": list(resolution),
        "generator": "ema" if (has_ema and use_ema) else "generator",
        "z": f"posterior of the real image (reparameterize), seed {seed}" if net.use_vae else None,
        "fid": None,
        "fid_real_stats": None,
        "segmenter": seg_name,
        "miou": None,
        "pixel_accuracy": None,
        "mean_accuracy": None,
        "fw_iou": None,
        "per_class_iou": None,
        "real_miou": None,
        "real_pixel_accuracy": None,
        "images_dir": str(images_dir),
    }
    if extractor is not None:
        stem = fid_stats_stem(data, split, fid_stats_dir)

        def real_batches():
            it = make_eval_iterator(
                data, batch_size=batch_size, split=split, process_index=0, process_count=1
            )
            for real in it:
                keep = np.asarray(real["mask"], bool)
                yield segmentation.images_to_uint8(real["image"])[keep]

        path = fid_lib.statistics_path(stem, count, resolution)
        logging.info("real FID statistics: %s%s", path, "" if path.is_file() else " (computing)")
        mu_real, sigma_real = fid_lib.cached_statistics(
            stem, real_batches, count=count, resolution=resolution, extractor=extractor
        )
        mu_fake, sigma_fake = fid_lib.statistics(np.concatenate(fake_feats))
        result["fid"] = fid_lib.frechet_distance(mu_fake, sigma_fake, mu_real, sigma_real)
        result["fid_real_stats"] = str(path)
        if count < 2048:
            logging.warning(
                "FID of %d images (< 2048, the feature size): the covariances are singular and "
                "the value is biased upwards; compare only numbers over the same image count",
                count,
            )
    if seg is not None:
        scores = segmentation.segmentation_metrics(conf, ignore)
        real = segmentation.segmentation_metrics(conf_real, ignore)
        result.update(
            miou=scores["miou"],
            pixel_accuracy=scores["pixel_accuracy"],
            mean_accuracy=scores["mean_accuracy"],
            fw_iou=scores["fw_iou"],
            per_class_iou=scores["per_class_iou"],
            real_miou=real["miou"],
            real_pixel_accuracy=real["pixel_accuracy"],
        )

    grid = image_grid(
        np.stack([r[0] for r in grid_rows]),
        np.stack([r[1] for r in grid_rows]),
        np.stack([r[2] for r in grid_rows]),
        num_classes,
    )
    Image.fromarray(grid).save(out_dir / "grid.png")
    result["grid"] = str(out_dir / "grid.png")
    result["seconds"] = round(time.time() - start_time, 2)
    for key in ("fid", "miou", "pixel_accuracy"):
        value = result[key]
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"{key} became {value} (step {step}, {count} images)")
    result = _jsonable(result)
    json_path = Path(workdir) / "eval" / f"{step}.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, json_path)

    scalars = {
        f"{split}/{k}": result[k]
        for k in ("fid", "miou", "pixel_accuracy", "real_miou", "real_pixel_accuracy")
        if result[k] is not None
    }
    writer = metric_writers.create_default_writer(str(Path(workdir) / "eval"), asynchronous=False)
    if scalars:
        writer.write_scalars(step, scalars)
    writer.write_images(step, {f"{split}/grid": grid[None]})
    writer.flush()
    writer.close()
    summary = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items())
    logging.info("step %d, %d images: %s -> %s", step, count, summary or "no scores", json_path)
    return result
