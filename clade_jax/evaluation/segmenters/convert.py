"""Official PyTorch state dicts and published `.pth` files -> the segmenters' NNX variables.

Every network module yields its official state-dict names (`torch_entries`, see `resnet.py`), so
the name map is explicit and total: one entry per official name, with the conversion (conv kernels
`(out, in, kh, kw)` -> `(kh, kw, in, out)`) and the torch shape it must have. Loading checks the
whole state first and reports every problem at once in one `WeightsError`:

* unknown names (in the state, not in the network), missing names (required by the network),
* shapes that do not fit the configured architecture (with the class count named when the
  classifier is the culprit),
* and, when most names are foreign, which of the three networks the state looks like (a DRN
  file given to `upernet101`, say).

Buffers the eval forward never reads (`num_batches_tracked`; mit-semseg SyncBN's
`_tmp_running_mean` / `_tmp_running_var` / `_running_iter`) are accepted (shape-checked) and
ignored, and are not required: older torch files lack `num_batches_tracked`.

Published files (`load_published_state`), read with the project's torch-free reader
(`clade_jax.convert.torch_io`); nothing is ever downloaded:
* upernet101: `encoder_epoch_50.pth` + `decoder_epoch_50.pth`, two state dicts without the
  `encoder.` / `decoder.` prefix (mit-semseg train.py saves them apart); given as a folder holding
  both or as the two paths (told apart by their contents).
* deeplabv2: `deeplabv2_resnet101_msc-cocostuff164k-100000.pth` (`base.*` names of the MSC model).
* drn_d_105: `drn-d-105_ms_cityscapes.pth` (`base.*`, `seg.*`, `up.weight`).
A `module.` prefix (DataParallel) on every name is removed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from clade_jax.convert import torch_io
from clade_jax.evaluation.segmenters.resnet import Entry

__all__ = [
    "PUBLISHED",
    "WeightsError",
    "check_state",
    "entries",
    "load_published_state",
    "load_state",
    "random_state",
]


class WeightsError(ValueError):
    """A state dict or weight file that does not fit the segmenter; the message names it."""


# name -> (file names, where they are published)
PUBLISHED = {
    "upernet101": (
        ("encoder_epoch_50.pth", "decoder_epoch_50.pth"),
        "http://sceneparsing.csail.mit.edu/model/pytorch/ade20k-resnet101-upernet/ "
        "(CSAILVision/semantic-segmentation-pytorch README, model zoo)",
    ),
    "deeplabv2": (
        ("deeplabv2_resnet101_msc-cocostuff164k-100000.pth",),
        "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0/"
        "deeplabv2_resnet101_msc-cocostuff164k-100000.pth (kazuto1011/deeplab-pytorch README)",
    ),
    "drn_d_105": (
        ("drn-d-105_ms_cityscapes.pth",),
        "http://dl.yf.io/drn/drn-d-105_ms_cityscapes.pth (fyu/drn README, 'DRN-D-105' "
        "Cityscapes segmentation model)",
    ),
}

# A name only each network's state dict has, to say what a foreign state looks like.
_SIGNATURES = {
    "upernet101": "decoder.ppm_last_conv.0.weight",
    "deeplabv2": "base.aspp.c0.weight",
    "drn_d_105": "up.weight",
}
# The classifier weight whose first dimension is the class count.
CLASSIFIER = {
    "upernet101": ("decoder.conv_last.1.weight", "num_class"),
    "deeplabv2": ("base.aspp.c0.weight", "n_classes"),
    "drn_d_105": ("seg.weight", "classes"),
}


def entries(model) -> dict[str, Entry]:
    """{official state-dict name: Entry} of a segmenter network (in official order)."""
    out: dict[str, Entry] = {}
    for e in model.torch_entries():
        if e.name in out:
            raise AssertionError(f"duplicate official name {e.name}")  # a bug in a torch_entries
        out[e.name] = e
    return out


def random_state(model, seed: int = 0) -> dict[str, np.ndarray]:
    """A random official state dict for `model` (NumPy, fast): He-normal (fan_in) conv weights,
    zero conv biases, identity BatchNorm, and DRN's fixed bilinear `up.weight`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, e in entries(model).items():
        if e.variable is None:
            continue
        shape = e.torch_shape
        if name.endswith("up.weight") and len(shape) == 4 and shape[1] == 1:
            from clade_jax.evaluation.segmenters.drn import bilinear_up_kernel

            out[name] = np.broadcast_to(bilinear_up_kernel(shape[-1]), shape).copy()
        elif len(shape) == 4:
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif name.endswith(("running_var", ".weight")):
            out[name] = np.ones(shape, np.float32)  # BN scale / running variance
        else:
            out[name] = np.zeros(shape, np.float32)  # BN bias / mean, conv bias
    return out


def _strip_module_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _looks_like(state: Mapping[str, np.ndarray]) -> str | None:
    for name, key in _SIGNATURES.items():
        if key in state:
            return name
    if any(k.startswith("ppm_") for k in state):
        return "upernet101 decoder file (decoder_epoch_50.pth: names without 'decoder.')"
    if "conv1.weight" in state and "layer4.0.conv1.weight" in state:
        return "upernet101 encoder file (encoder_epoch_50.pth: names without 'encoder.')"
    return None


def check_state(
    model, state: Mapping[str, np.ndarray], *, network: str, source: str = "state"
) -> dict[str, np.ndarray]:
    """Check an official state dict against `model` (abstract is fine) without loading it.

    Args:
      model: a segmenter network (`UperNet101`, `DeepLabV2`, `DRNSeg`), maybe from eval_shape.
      state: {torch name: array} (anything with `.shape` works: names and shapes are checked).
      network: its registry name, for the messages.
      source: what the state came from (a file name), for the messages.

    Returns:
      {name: array} of the entries to load (the ignored buffers left out).

    Raises:
      WeightsError: unknown / missing names or wrong shapes, all listed.
    """
    state = _strip_module_prefix(state)
    expected = entries(model)
    unknown = [k for k in state if k not in expected]
    missing = [k for k, e in expected.items() if e.variable is not None and k not in state]
    problems = []
    if unknown and len(unknown) >= len(state) // 2:
        looks = _looks_like(state)
        if looks is not None and not looks.startswith(network):
            problems.append(f"this is not a {network} state: it looks like a {looks} state")
    cls_name, cls_arg = CLASSIFIER[network]
    if cls_name in state and cls_name in expected:
        got, want = int(np.shape(state[cls_name])[0]), expected[cls_name].torch_shape[0]
        if got != want:
            problems.append(
                f"class count: the state has {got} classes ({cls_name} {np.shape(state[cls_name])})"
                f" but the network is configured with {cls_arg}={want}"
            )
    if unknown:
        problems.append(f"{len(unknown)} unknown names: {_listing(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing names: {_listing(missing)}")
    values = {}
    for name, array in state.items():
        e = expected.get(name)
        if e is None:
            continue
        shape = tuple(np.shape(array))
        if shape != e.torch_shape:
            problems.append(
                f"{name}: shape {shape}, the configured {network} needs {e.torch_shape}"
            )
            continue
        if e.variable is not None:
            values[name] = array
    if problems:
        raise WeightsError(
            f"{source} does not fit {network} as configured:\n  " + "\n  ".join(problems)
        )
    return values


def load_state(
    model, state: Mapping[str, np.ndarray], *, network: str, source: str = "state"
) -> None:
    """Copy an official state dict into `model` in place, after `check_state` passes on all of it.

    Raises:
      WeightsError: unknown / missing names or wrong shapes, all listed.
    """
    values = check_state(model, state, network=network, source=source)
    expected = entries(model)
    for name, array in values.items():
        e = expected[name]
        e.variable.set_value(jnp.asarray(e.to_ours(np.asarray(array, np.float32)), jnp.float32))
    unset = [k for k, e in expected.items() if e.variable is not None and k not in values]
    if unset:  # cannot happen after the checks above; an abstract model must be filled in fully
        raise AssertionError(f"variables left unset: {unset}")


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _missing_file(network: str, path: Path) -> WeightsError:
    files, where = PUBLISHED[network]
    return WeightsError(
        f"{network} weights: {path} does not exist. The published file(s) {', '.join(files)} "
        f"are at {where}; download them yourself (nothing is downloaded here) and pass the path."
    )


def _read(network: str, path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise _missing_file(network, path)
    try:
        return _strip_module_prefix(torch_io.load_torch_file(path))
    except torch_io.TorchFileError as e:
        raise WeightsError(f"{network} weights: {e}") from None


def load_published_state(
    network: str, path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]
) -> tuple[dict[str, np.ndarray], str]:
    """Read a network's published `.pth` file(s) into one official state dict.

    Args:
      network: "upernet101" | "deeplabv2" | "drn_d_105".
      path_or_paths: the file; for upernet101 the folder holding encoder_epoch_50.pth and
        decoder_epoch_50.pth, or the two files (in either order).

    Returns:
      ({official name: array}, a description of the source for messages).

    Raises:
      WeightsError: a file is missing (naming it and where it is published) or unreadable.
    """
    if network not in PUBLISHED:
        raise WeightsError(f"unknown segmenter {network!r}; choose one of {sorted(PUBLISHED)}")
    files, _ = PUBLISHED[network]
    if isinstance(path_or_paths, str | os.PathLike):
        paths = [Path(path_or_paths)]
    else:
        paths = [Path(p) for p in path_or_paths]
    if network != "upernet101":
        if len(paths) != 1:
            raise WeightsError(f"{network} weights are one file ({files[0]}), got {len(paths)}")
        path = paths[0] / files[0] if paths[0].is_dir() else paths[0]
        return _read(network, path), str(path)
    if len(paths) == 1:
        if not paths[0].is_dir():
            if not paths[0].exists():
                raise _missing_file(network, paths[0])
            raise WeightsError(
                f"upernet101 weights are two files ({files[0]}, {files[1]}): pass their folder "
                f"or both paths, not only {paths[0]}"
            )
        paths = [paths[0] / f for f in files]
    if len(paths) != 2:
        raise WeightsError(f"upernet101 weights are two files ({files[0]}, {files[1]})")
    for p in paths:  # name every missing file before reading any
        if not p.is_file():
            raise _missing_file(network, p)
    parts = [_read(network, p) for p in paths]
    state: dict[str, np.ndarray] = {}
    kinds = []
    for path, part in zip(paths, parts, strict=True):
        if any(k.startswith(("encoder.", "decoder.")) for k in part):
            kind = "full"  # a SegmentationModule state dict saved whole
            state.update(part)
        elif "conv1.weight" in part:
            kind = "encoder"
            state.update({f"encoder.{k}": v for k, v in part.items()})
        elif any(k.startswith(("ppm_", "fpn_", "conv_last")) for k in part):
            kind = "decoder"
            state.update({f"decoder.{k}": v for k, v in part.items()})
        else:
            raise WeightsError(
                f"{path}: neither an UperNet encoder (conv1.weight, layer1..4) nor a decoder "
                f"(ppm_*, fpn_*, conv_last) state dict; first names: {_listing(list(part), 5)}"
            )
        kinds.append(kind)
    if sorted(kinds) != ["decoder", "encoder"] and "full" not in kinds:
        raise WeightsError(
            f"upernet101 needs one encoder and one decoder file, got {kinds} from "
            f"{', '.join(map(str, paths))}"
        )
    return state, " + ".join(map(str, paths))
