"""The VGG19 perceptual loss: torchvision names, the official slices and weights, no gradient
through the real image, and a clear error without weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clade_jax.models.vgg import CONV_INDICES, LAYER_WEIGHTS, load_vgg19, vgg19_features, vgg_loss

WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512]


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-named vgg19 state dict with random weights, as .npz."""
    rng = np.random.default_rng(0)
    state, cin = {}, 3
    for i, cout in zip(CONV_INDICES, WIDTHS, strict=True):
        state[f"features.{i}.weight"] = rng.normal(
            0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3)
        ).astype(np.float32)
        state[f"features.{i}.bias"] = rng.normal(0, 0.01, (cout,)).astype(np.float32)
        cin = cout
    path = tmp_path_factory.mktemp("vgg") / "vgg19.npz"
    np.savez(path, **state)
    return path


def test_features_are_the_official_slices(vgg_file):
    params = load_vgg19(vgg_file)
    feats = vgg19_features(params, jnp.zeros((1, 32, 32, 3)))
    assert [f.shape for f in feats] == [
        (1, 32, 32, 64),
        (1, 16, 16, 128),
        (1, 8, 8, 256),
        (1, 4, 4, 512),
        (1, 2, 2, 512),
    ]
    # relu1_1 is one conv + ReLU of the input: check against a direct computation.
    x = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3), minval=-1, maxval=1)
    k, b = params["features.0"]
    ref = jax.nn.relu(
        jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        + b
    )
    np.testing.assert_allclose(
        np.asarray(vgg19_features(params, x)[0]), np.asarray(ref), rtol=1e-5, atol=1e-6
    )


def test_loss_value_and_gradient(vgg_file):
    params = load_vgg19(vgg_file)
    kf, kr = jax.random.split(jax.random.key(1))
    fake = jax.random.uniform(kf, (2, 32, 32, 3), minval=-1, maxval=1)
    real = jax.random.uniform(kr, (2, 32, 32, 3), minval=-1, maxval=1)
    assert float(vgg_loss(params, real, real)) == 0.0
    feats_f, feats_r = vgg19_features(params, fake), vgg19_features(params, real)
    expected = sum(
        w * jnp.mean(jnp.abs(a - b))
        for w, a, b in zip(LAYER_WEIGHTS, feats_f, feats_r, strict=True)
    )
    np.testing.assert_allclose(float(vgg_loss(params, fake, real)), float(expected), rtol=1e-5)
    g_real = jax.grad(lambda r: vgg_loss(params, fake, r))(real)
    assert float(jnp.abs(g_real).max()) == 0.0  # the real image's features carry no gradient
    assert float(jnp.abs(jax.grad(lambda f: vgg_loss(params, f, real))(fake)).max()) > 0


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="vgg_weights"):
        load_vgg19("")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg19(tmp_path / "nope.pth")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(1))
    with pytest.raises(ValueError, match="not a torchvision vgg19"):
        load_vgg19(bad)
