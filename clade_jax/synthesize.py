"""Synthesize photos from label-map PNGs with a trained (or converted) model: library and CLI.

    python -m clade_jax.synthesize --workdir=DIR --labels=maps/ --out=out/
    python -m clade_jax.synthesize --workdir=DIR --labels=a.png --out=out/ --num_samples=4 --seed=1
    python -m clade_jax.synthesize --workdir=DIR --labels=a.png --out=out/ --style=photo.jpg

Inputs:

* Label maps are single-channel PNGs (8- or 16-bit grey, or palette images whose indices are the
  ids) whose pixel values are the model's class ids, in [0, num_classes) (`--label_encoding=ids`,
  the default): the ids the generator was trained on, after the data set's remapping (ADE20k: the
  150 classes are 0..149 and don't-care is 150). `--label_encoding=dataset` instead applies the
  data set's own PNG encoding from `config.data` (ADE20k: raw 0 = "unknown" -> 150, k -> k - 1;
  COCO-Stuff: 255 -> 182), so the data set's annotation files can be used as they are. Every file
  is validated (readable, single channel, integer, values in range) and a bad file raises a
  `DataError` naming the file and the offending values.
* Maps of another size are resized to the model's output size with the nearest rule the data
  pipeline used in training (`config.data.label_resize`); ICPE maps (CLADE-ICPE models) are then
  computed from the resized map, as in the pipeline.
* Instance maps (`--instances`, models trained with instance maps only): a file, a folder whose
  files are matched to the label maps by name stem, or a list in the same order as the labels.

Sampling:

* Models without the VAE encoder are deterministic: one image per label map (`num_samples` > 1
  is an error).
* VAE models draw z ~ N(0, I) (multi-modal synthesis). Sample k uses the key
  `fold_in(PRNGKey(seed), k)`, the same for every label map: sample k of two maps shares its
  latent code (the same "style"), and the same seed always gives the same images.
* `--style=IMAGE` (VAE models only): the image is resized (bicubic) to the output size, encoded,
  and z is drawn from the encoder's posterior N(mu, sigma^2) with the same per-sample keys, as the
  official test does with a real image (`reparameterize`, not the mean).

Outputs: `<out>/<label stem>.png` (one sample) or `<out>/<label stem>_sample<k>.png`. Images are
quantized to uint8 as the official `tensor2im` (`(x + 1) / 2 * 255`, clipped, truncated).

The model side (restoring a workdir, `InferenceModel`, `to_uint8`) is `clade_jax.inference`; this
module adds the file readers, the batching over files and the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from clade_jax.data.decoding import label_encoding, read_id_map, read_image
from clade_jax.data.layouts import DataError, natural_key
from clade_jax.data.transforms import resize_ids, resize_image
from clade_jax.inference import (
    InferenceModel,
    load_inference_model,
    pad_batch,
    sample_keys,
    to_uint8,
)
from clade_jax.layers.labels import check_labels, icpe_offsets

LABEL_ENCODINGS = ("ids", "dataset")
IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm")


# ----------------------------------------------------------------------------- inputs


def list_files(paths: str | os.PathLike | Sequence[str | os.PathLike], what: str) -> list[Path]:
    """A file, a folder (its image files, sorted by name) or a list of files -> list of paths.

    Args:
      paths: the argument as given.
      what: "label map", "instance map" (for error messages).

    Returns:
      The files, in order.
    """
    if isinstance(paths, (str, os.PathLike)):
        p = Path(paths)
        if p.is_dir():
            files = sorted(
                (f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES),
                key=lambda f: natural_key(f.name),
            )
            if not files:
                raise FileNotFoundError(
                    f"no {what} images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}"
                )
            return files
        paths = [p]
    files = [Path(f) for f in paths]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{what} {f} does not exist")
    return files


def read_label_map(
    path: str | os.PathLike,
    config: Any,
    *,
    size: tuple[int, int],
    encoding: str = "ids",
) -> np.ndarray:
    """Read, validate, remap and resize one label PNG.

    Args:
      path: the file.
      config: the run's config (`data.num_classes`, the encoding fields, `data.label_resize`).
      size: (height, width) of the model's output.
      encoding: "ids" (pixel values are class ids in [0, num_classes)) or "dataset" (the data
        set's PNG encoding, `clade_jax.data.decoding.label_encoding`).

    Returns:
      (height, width) int32 class ids.

    Raises:
      DataError: unreadable file, not a single-channel integer image, or values out of range;
        the message names the file and the values.
    """
    if encoding not in LABEL_ENCODINGS:
        raise ValueError(f"label encoding must be one of {LABEL_ENCODINGS}, got {encoding!r}")
    name = str(path)
    raw = read_id_map(name, name)  # DataError naming the file if unreadable / not 1-channel
    if raw.ndim != 2:
        raise DataError(f"label map {name}: expected a 2-D map, got shape {raw.shape}")
    num_classes = int(config.data.num_classes)
    if encoding == "dataset":
        label = label_encoding(config.data)(raw, name)
    else:
        try:
            check_labels(raw, num_classes, source=f"label map {name}")
        except ValueError as e:
            raise DataError(
                f"{e} (expected class ids in [0, {num_classes}) as pixel values; use "
                "label_encoding='dataset' for the data set's own PNG encoding)"
            ) from None
        label = raw
    if label.shape != tuple(size):
        logging.info("%s: resizing %s -> %s (nearest)", name, label.shape, tuple(size))
        label = resize_ids(label, tuple(size), config.data.get("label_resize", "pil"))
    return np.ascontiguousarray(label, np.int32)


def read_instance_map(path: str | os.PathLike, config: Any, *, size: tuple[int, int]):
    """Read one instance-id PNG and resize it (nearest) to `size`; (H, W) int32."""
    name = str(path)
    inst = read_id_map(name, name)
    if inst.ndim != 2:
        raise DataError(f"instance map {name}: expected a 2-D map, got shape {inst.shape}")
    return resize_ids(inst, tuple(size), config.data.get("label_resize", "pil"))


def read_style_image(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Read an RGB image, resize it (bicubic) to `size`; (H, W, 3) float32 in [-1, 1]."""
    image = resize_image(read_image(str(path), str(path)), tuple(size))
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _match_instances(
    instances: str | os.PathLike | Sequence[str | os.PathLike], label_files: list[Path]
) -> list[Path]:
    """Instance file per label file: by name stem (folder) or by position (file / list)."""
    if isinstance(instances, (str, os.PathLike)) and Path(instances).is_dir():
        by_stem = {f.stem: f for f in list_files(instances, "instance map")}
        missing = [str(f) for f in label_files if f.stem not in by_stem]
        if missing:
            raise FileNotFoundError(
                f"no instance map named like label map(s) {missing[:5]} in {instances}"
            )
        return [by_stem[f.stem] for f in label_files]
    files = list_files(instances, "instance map")
    if len(files) != len(label_files):
        raise ValueError(f"{len(files)} instance maps for {len(label_files)} label maps")
    return files


# ----------------------------------------------------------------------------- synthesis


def synthesize(
    workdir: str,
    labels: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    style: str | os.PathLike | None = None,
    num_samples: int = 1,
    seed: int = 0,
    instances: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    label_encoding: str = "ids",
    step: int | None = None,
    use_ema: bool = True,
    batch_size: int = 8,
    model: tuple[Any, InferenceModel] | None = None,
) -> list[Path]:
    """Synthesize images from label-map files (see the module docstring for every convention).

    Args:
      workdir: a training or converted workdir.
      labels: a label PNG, a folder of them, or a list of files.
      out_dir: where the PNGs go (created).
      style: a reference photo for style-guided synthesis (VAE models only).
      num_samples: images per label map (> 1 needs a VAE model).
      seed: base seed of the latent codes (VAE models).
      instances: instance maps (models trained with them; required there).
      label_encoding: "ids" or "dataset".
      step: checkpoint step (default: the latest).
      use_ema: use the EMA generator when there is one.
      batch_size: label maps per compiled call (the last batch is padded).
      model: (config, InferenceModel) already loaded (skips restoring `workdir`).

    Returns:
      The written files, label-major (all samples of the first map, then the next map's).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    label_files = list_files(labels, "label map")
    stems = [f.stem for f in label_files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"label maps with the same name {dupes} would overwrite each other")
    if model is None:
        config, net, _ = load_inference_model(workdir, step, use_ema=use_ema)
    else:
        config, net = model
    if style is not None and not net.has_encoder:
        raise ValueError(
            f"--style needs a model with the VAE encoder, but the model in {workdir} was trained "
            "without it (model.use_vae = False); train with the `vae` config flag"
        )
    if num_samples > 1 and not net.use_vae:
        raise ValueError(
            f"num_samples={num_samples}: the model in {workdir} has no latent code "
            "(model.use_vae = False), so every sample would be the same image"
        )
    if net.use_instance and instances is None:
        raise ValueError(
            f"the model in {workdir} was trained with instance maps (data.use_instance): "
            "pass instances= / --instances"
        )
    if instances is not None and not net.use_instance:
        logging.warning("the model does not use instance maps: ignoring %s", instances)
        instances = None
    size = net.output_size
    dontcare = int(config.data.get("dontcare_label", -1))
    # Read and validate everything before synthesizing anything.
    label_maps = [
        read_label_map(f, config, size=size, encoding=label_encoding) for f in label_files
    ]
    instance_maps = None
    if instances is not None:
        inst_files = _match_instances(instances, label_files)
        instance_maps = [read_instance_map(f, config, size=size) for f in inst_files]
    icpe_maps = None
    if net.use_icpe:
        ignore = (dontcare,) if dontcare >= 0 else ()
        icpe_maps = [icpe_offsets(lab, ignore=ignore) for lab in label_maps]
    style_image = read_style_image(style, size) if style is not None else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(label_maps)
    bs = max(1, min(batch_size, n))
    written: dict[tuple[int, int], Path] = {}
    for start in range(0, n, bs):
        rows = list(range(start, min(start + bs, n)))
        maps = {"labels": label_maps, "instance": instance_maps, "icpe": icpe_maps}
        batch = {
            k: None if v is None else pad_batch(np.stack([v[i] for i in rows]), bs)
            for k, v in maps.items()
        }
        batch["style"] = None if style_image is None else np.stack([style_image] * bs)
        for k in range(num_samples):
            keys = sample_keys(seed, k, bs) if net.use_vae else None
            images = to_uint8(net(**batch, keys=keys))
            for j, i in enumerate(rows):
                name = stems[i] if num_samples == 1 else f"{stems[i]}_sample{k}"
                path = out / f"{name}.png"
                Image.fromarray(images[j]).save(path)
                written[(i, k)] = path
        logging.info("synthesized %d / %d label maps", min(start + bs, n), n)
    return [written[key] for key in sorted(written)]


# ----------------------------------------------------------------------------- CLI


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "training or converted workdir (config.json)")
    flags.DEFINE_string("labels", None, "a label-map PNG or a folder of them")
    flags.DEFINE_string("out", None, "output folder")
    flags.DEFINE_string("style", None, "reference image for style-guided synthesis (VAE models)")
    flags.DEFINE_integer("num_samples", 1, "images per label map (VAE models for > 1)")
    flags.DEFINE_integer("seed", 0, "base seed of the latent codes")
    flags.DEFINE_string("instances", None, "instance-map PNG or folder (models that use them)")
    flags.DEFINE_enum(
        "label_encoding",
        "ids",
        list(LABEL_ENCODINGS),
        "ids: pixel values are class ids in [0, num_classes); dataset: the data set's PNG "
        "encoding (e.g. ADE20k's 0 = unknown)",
    )
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_bool("ema", True, "use the EMA generator when the run kept one")
    flags.DEFINE_integer("batch_size", 8, "label maps per compiled call")
    flags.mark_flags_as_required(["workdir", "labels", "out"])


def main(argv) -> None:
    """CLI: flags -> `synthesize`."""
    from absl import flags

    del argv
    f = flags.FLAGS
    files = synthesize(
        f.workdir,
        f.labels,
        f.out,
        style=f.style,
        num_samples=f.num_samples,
        seed=f.seed,
        instances=f.instances,
        label_encoding=f.label_encoding,
        step=f.step,
        use_ema=f.ema,
        batch_size=f.batch_size,
    )
    logging.info("wrote %d images to %s", len(files), f.out)


if __name__ == "__main__":
    from clade_jax import cli

    _define_flags()
    cli.run(main)  # console lines, user errors -> one paragraph and exit 2, --traceback
