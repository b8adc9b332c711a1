"""Public, stable layers of clade_jax, usable inside any Flax NNX model.

from clade_jax.layers import CLADE
norm = CLADE(num_features=256, num_classes=151, norm="batch", rngs=nnx.Rngs(0))
y = norm(x, labels)  # x (N, H, W, C), labels (N, h, w) int32
"""

from clade_jax.layers.clade import CLADE, ClassAffine, gather_classes
from clade_jax.layers.conv import (
    Conv2d,
    Linear,
    SpectralVector,
    fold_spectral_norm,
    xavier_normal,
)
from clade_jax.layers.labels import (
    check_labels,
    icpe_offsets,
    instance_edges,
    resize_nearest,
    resize_nearest_np,
)
from clade_jax.layers.normalization import NORM_KINDS, ParamFreeNorm
from clade_jax.layers.spade import SPADE, semantic_input

__all__ = [
    "CLADE",
    "NORM_KINDS",
    "SPADE",
    "ClassAffine",
    "Conv2d",
    "Linear",
    "ParamFreeNorm",
    "SpectralVector",
    "check_labels",
    "fold_spectral_norm",
    "gather_classes",
    "icpe_offsets",
    "instance_edges",
    "resize_nearest",
    "resize_nearest_np",
    "semantic_input",
    "xavier_normal",
]
