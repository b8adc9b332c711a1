"""VGG19 features and the perceptual loss of the SPADE / CLADE training (`lambda_vgg`).

The official `VGGLoss` compares the relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 activations of
an ImageNet-pretrained torchvision VGG19 on the fake and the real image with L1, weighted
1/32, 1/16, 1/8, 1/4, 1, and feeds the [-1, 1] images to VGG **without** ImageNet mean/std
normalisation (a quirk we keep). The real image's features carry no gradient.

No weights can be downloaded here: `load_vgg19(path)` reads a torchvision `vgg19` state dict
(`.pth`, read without torch by `clade_jax.convert.torch_io`, or an `.npz` with the same names
`features.<i>.weight` / `features.<i>.bias`). Get one with
    python -c "import torch, torchvision; torch.save(torchvision.models.vgg19(
        weights='IMAGENET1K_V1').state_dict(), 'vgg19.pth')"
on a machine with internet and set `config.loss.vgg_weights` to it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg19 `features` indices of the 16 convolutions used up to relu5_1 (index 29), and
# where each slice of the official loss ends (after the ReLU following conv index 0, 5, 10, 19, 28).
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)
POOL_AFTER = (2, 7, 16, 25)  # a 2x2 max pool follows these convolutions
SLICE_ENDS = (0, 5, 10, 19, 28)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)


def load_vgg19(path: str | os.PathLike) -> dict[str, jnp.ndarray]:
    """torchvision vgg19 state dict -> {'features.<i>': (kernel (3,3,in,out), bias)} arrays."""
    path = os.fspath(path)
    if not path:
        raise ValueError(
            "config.loss.lambda_vgg > 0 needs config.loss.vgg_weights: a torchvision vgg19 state "
            'dict, e.g. made with `python -c "import torch, torchvision; torch.save(torchvision.'
            "models.vgg19(weights='IMAGENET1K_V1').state_dict(), 'vgg19.pth')\"`; or set "
            "loss.lambda_vgg=0"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"VGG19 weights {path!r} (config.loss.vgg_weights) do not exist")
    if path.endswith(".npz"):
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
    else:
        from clade_jax.convert.torch_io import load_torch_file

        state = load_torch_file(path)
    params = {}
    for i in CONV_INDICES:
        w, b = state.get(f"features.{i}.weight"), state.get(f"features.{i}.bias")
        if w is None or b is None:
            raise ValueError(f"{path}: not a torchvision vgg19 state dict (no features.{i}.*)")
        params[f"features.{i}"] = (
            jnp.asarray(np.transpose(w, (2, 3, 1, 0)), jnp.float32),
            jnp.asarray(b, jnp.float32),
        )
    return params


def vgg19_features(params: dict, x: jnp.ndarray) -> list[jnp.ndarray]:
    """x (N, H, W, 3) -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1] activations (NHWC)."""
    outs = []
    for i in CONV_INDICES:
        kernel, bias = params[f"features.{i}"]
        x = jax.lax.conv_general_dilated(
            x,
            kernel.astype(x.dtype),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = jax.nn.relu(x + bias.astype(x.dtype))
        if i in SLICE_ENDS:
            outs.append(x)
        if i == SLICE_ENDS[-1]:
            break
        if i in POOL_AFTER:
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return outs


def vgg_loss(params: dict, fake: jnp.ndarray, real: jnp.ndarray) -> jnp.ndarray:
    """Unweighted official VGG loss: sum_i w_i * L1(vgg_i(fake), vgg_i(real)); times lambda_vgg."""
    n = fake.shape[0]
    feats = vgg19_features(params, jnp.concatenate([fake, real]))
    total = 0.0
    for w, f in zip(LAYER_WEIGHTS, feats, strict=True):
        diff = f[:n].astype(jnp.float32) - jax.lax.stop_gradient(f[n:].astype(jnp.float32))
        total = total + w * jnp.mean(jnp.abs(diff))
    return total
