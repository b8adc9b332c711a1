"""The VGG19 perceptual loss: torchvision names, the official slices and weights, no gradient
through the real image, and a clear error without weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clade_jax.models.vgg import load_vgg19, vgg19_features, vgg_loss

# torchvision's `vgg19().features`, written out from its configuration "E": a number is a 3x3
# conv (padding 1) to that many channels followed by a ReLU, "M" a 2x2 max pool. Module indices
# count every conv, ReLU and pool, as the state dict's `features.<i>.weight` names do.
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"]
VGG19_CFG += [512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# The official VGGLoss (SPADE models/networks/architecture.py): slices end after these ReLU
# modules, relu1_1, relu2_1, relu3_1, relu4_1, relu5_1, and the L1 terms are weighted so.
OFFICIAL_TAPS = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu5_1": 29}
OFFICIAL_WEIGHTS = [1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0]


def torchvision_layout() -> list[tuple]:
    """[(index, kind, name, cin, cout)] of vgg19.features: kind conv / relu / pool."""
    layers, cin, block, k = [], 3, 1, 0
    for v in VGG19_CFG:
        if v == "M":
            layers.append((len(layers), "pool", f"pool{block}", cin, cin))
            block, k = block + 1, 0
        else:
            k += 1
            layers.append((len(layers), "conv", f"conv{block}_{k}", cin, v))
            layers.append((len(layers), "relu", f"relu{block}_{k}", v, v))
            cin = v
    return layers


def test_layout_is_torchvisions():
    layers = torchvision_layout()
    assert len(layers) == 37  # vgg19.features has modules 0..36
    convs = [(i, cin, cout) for i, kind, _, cin, cout in layers if kind == "conv"]
    assert len(convs) == 16
    assert [i for i, _, _ in convs] == [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    names = {name: i for i, kind, name, _, _ in layers if kind == "relu"}
    assert {k: names[k] for k in OFFICIAL_TAPS} == OFFICIAL_TAPS


@pytest.fixture(scope="module")
def vgg_state():
    """A torchvision-named vgg19 state dict (all 16 convs) with random He-normal weights."""
    rng = np.random.default_rng(0)
    state = {}
    for i, kind, _, cin, cout in torchvision_layout():
        if kind == "conv":
            w = rng.normal(0, np.sqrt(2 / (9 * cin)), (cout, cin, 3, 3))
            state[f"features.{i}.weight"] = w.astype(np.float32)
            state[f"features.{i}.bias"] = rng.normal(0, 0.1, (cout,)).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def vgg_file(vgg_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg19.npz"
    np.savez(path, **vgg_state)
    return path


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x (N, H, W, Cin) float64, torch weight (Cout, Cin, 3, 3), zero padding 1."""
    n, h, wd, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, wd, w.shape[0]))
    for dy in range(3):
        for dx in range(3):
            out += xp[:, dy : dy + h, dx : dx + wd] @ w[:, :, dy, dx].T.astype(np.float64)
    return out + b


def reference_taps(state: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """The torchvision forward in float64 NumPy, recording every ReLU output by name."""
    out, x = {}, np.asarray(x, np.float64)
    for i, kind, name, _, _ in torchvision_layout():
        if kind == "conv":
            x = _conv3x3(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"])
        elif kind == "relu":
            x = np.maximum(x, 0)
            out[name] = x
        else:
            n, h, w, c = x.shape
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
        if i == max(OFFICIAL_TAPS.values()):
            break
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def images():
    kf, kr = jax.random.split(jax.random.key(1))
    fake = jax.random.uniform(kf, (2, 32, 32, 3), minval=-1, maxval=1)
    real = jax.random.uniform(kr, (2, 32, 32, 3), minval=-1, maxval=1)
    return fake, real


def test_every_tap_is_the_official_layer_by_value(vgg_state, vgg_file, images):
    fake, _ = images
    feats = vgg19_features(load_vgg19(vgg_file), fake)
    ref = reference_taps(vgg_state, np.asarray(fake))
    assert len(feats) == len(OFFICIAL_TAPS)
    for name, ours in zip(OFFICIAL_TAPS, feats, strict=True):
        assert np.linalg.norm(ref[name]) > 0, name
        assert _rel(ours, ref[name]) <= 1e-5, name
    # Neighbouring ReLUs have the same shapes but other values: a tap one layer off would fail.
    for name, other in (
        ("relu1_1", "relu1_2"),
        ("relu2_1", "relu2_2"),
        ("relu3_1", "relu3_2"),
        ("relu4_1", "relu4_2"),
    ):
        i = list(OFFICIAL_TAPS).index(name)
        assert ref[other].shape == ref[name].shape and _rel(feats[i], ref[other]) > 0.1


def test_loss_value_and_gradient(vgg_state, vgg_file, images):
    params = load_vgg19(vgg_file)
    fake, real = images
    assert float(vgg_loss(params, real, real)) == 0.0
    rf = reference_taps(vgg_state, np.asarray(fake))
    rr = reference_taps(vgg_state, np.asarray(real))
    expected = sum(
        w * np.mean(np.abs(rf[name] - rr[name]))
        for w, name in zip(OFFICIAL_WEIGHTS, OFFICIAL_TAPS, strict=True)
    )
    np.testing.assert_allclose(float(vgg_loss(params, fake, real)), expected, rtol=1e-5)
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
