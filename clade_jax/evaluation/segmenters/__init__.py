"""The papers' three evaluation segmenters in NNX, converted from their published PyTorch weights.

    from clade_jax.evaluation import segmenters
    seg = segmenters.from_official("drn_d_105", state)             # state: torch names -> arrays
    seg = segmenters.load("upernet101", "weights/ade20k-resnet101-upernet/")   # published files
    scores = seg.scores(images_u8, label_size=(h, w), multiscale=False)       # (N, h, w, K)
    pred = segmenters.labels.predictions(scores)

    name          network                              data set     published weights
    upernet101    UperNet, deep-stem ResNet-101 (mit)  ADE20K 150   encoder/decoder_epoch_50.pth
    deeplabv2     DeepLabV2 ResNet-101 MSC (kazuto)    COCO-Stuff   deeplabv2_resnet101_msc-...pth
    drn_d_105     DRN-D-105 DRNSeg (fyu/drn)           Cityscapes   drn-d-105_ms_cityscapes.pth

Modules: `upernet`, `deeplab`, `drn` (networks + protocol docstrings), `resnet` (shared blocks),
`resize` (torch / PIL resize semantics), `convert` (name map, checks, `.pth` reading),
`segmenter` (protocols), `labels` (label mappings, argmax, confusion matrix).

`from_official(name, state, **config)`: config holds the architecture arguments the fixtures'
meta "config" records (upernet101: layers, width, fpn_dim, num_class; deeplabv2: n_blocks,
width, n_classes; drn_d_105: layers, channels, classes), defaulting to the full-size networks.
The fixture-only entries of that record (size, seed_model, seed_data, conv_gain) are accepted and
ignored, so a fixture's whole config can be passed; any other unknown argument is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from clade_jax.evaluation.segmenters import convert, deeplab, drn, labels, upernet
from clade_jax.evaluation.segmenters.convert import PUBLISHED, WeightsError
from clade_jax.evaluation.segmenters.segmenter import (
    DeepLabSegmenter,
    DRNSegmenter,
    Segmenter,
    UperNetSegmenter,
)

__all__ = [
    "NAMES",
    "PUBLISHED",
    "Segmenter",
    "WeightsError",
    "abstract",
    "build",
    "convert",
    "from_official",
    "labels",
    "load",
    "parameter_count",
]

NAMES = ("upernet101", "deeplabv2", "drn_d_105")
_NETWORKS = {
    "upernet101": (upernet.UperNet101, upernet.DEFAULT_CONFIG, UperNetSegmenter),
    "deeplabv2": (deeplab.DeepLabV2, deeplab.DEFAULT_CONFIG, DeepLabSegmenter),
    "drn_d_105": (drn.DRNSeg, drn.DEFAULT_CONFIG, DRNSegmenter),
}
_EXTRA_ARGS = {"deeplabv2": ("atrous_rates",)}
_FIXTURE_RECORD_KEYS = ("size", "seed_model", "seed_data", "conv_gain")


def _network(name: str):
    if name not in _NETWORKS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {list(NAMES)}")
    return _NETWORKS[name]


def _arch_kwargs(name: str, config: Mapping) -> dict:
    _, defaults, _ = _network(name)
    allowed = set(defaults) | set(_EXTRA_ARGS.get(name, ()))
    unknown = sorted(k for k in config if k not in allowed and k not in _FIXTURE_RECORD_KEYS)
    if unknown:
        raise TypeError(
            f"{name}: unknown architecture argument(s) {unknown}; it takes {sorted(allowed)}"
        )
    return {**defaults, **{k: v for k, v in config.items() if k in allowed}}


def build(name: str, *, seed: int = 0, **config) -> nnx.Module:
    """The bare network, randomly initialised (`convert.random_state`: He-normal convs,
    identity BatchNorm), built abstractly and filled from NumPy (no per-layer compiles)."""
    kwargs = _arch_kwargs(name, config)
    net = _abstract(name, kwargs)
    convert.load_state(net, convert.random_state(net, seed), network=name, source="random init")
    return net


def abstract(name: str, **config) -> nnx.Module:
    """The network with abstract variables (`nnx.eval_shape`): shapes and names, no memory."""
    return _abstract(name, _arch_kwargs(name, config))


def _abstract(name: str, kwargs: dict) -> nnx.Module:
    cls, _, _ = _network(name)
    return nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))


def parameter_count(name: str, **config) -> int:
    """Number of parameters (as torch's `parameters()`), counted with `nnx.eval_shape`."""
    abstract = _abstract(name, _arch_kwargs(name, config))
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
    return sum(int(np.prod(v.shape)) for v in leaves)


def from_official(
    name: str, state: Mapping[str, np.ndarray] | None, *, source: str = "state", **config
) -> Segmenter:
    """A segmenter with its official protocol, from an official state dict.

    Args:
      name: "upernet101" | "deeplabv2" | "drn_d_105".
      state: torch state-dict names -> arrays (buffers the eval forward never reads are
        accepted and ignored), or None for a random init.
      source: what `state` came from, for error messages.
      **config: architecture arguments (see the module docstring), defaulting to full size.

    Returns:
      A `Segmenter` (`.scores`, `.predict`, `.features`, `.net`).

    Raises:
      WeightsError: the state does not fit (unknown / missing names, shapes, class count).
    """
    _, _, seg_cls = _network(name)
    if state is None:
        net = build(name, **config)
    else:
        # Every variable comes from the state: build abstractly, then fill in (no init cost).
        net = _abstract(name, _arch_kwargs(name, config))
        convert.load_state(net, state, network=name, source=source)
    return seg_cls(net)


def load(
    name: str, path_or_paths: str | os.PathLike | Sequence[str | os.PathLike], **config
) -> Segmenter:
    """`from_official` on the published `.pth` file(s), read without torch.

    Args:
      name: "upernet101" | "deeplabv2" | "drn_d_105".
      path_or_paths: the file; for upernet101 the folder holding encoder_epoch_50.pth and
        decoder_epoch_50.pth, or those two paths.
      **config: architecture arguments (default: the published full-size networks).

    Raises:
      WeightsError: a missing file (named, with where it is published; nothing is downloaded),
        an unreadable one, or a state that does not fit.
    """
    _network(name)
    state, source = convert.load_published_state(name, path_or_paths)
    return from_official(name, state, source=source, **config)
