"""SPADE's windowed modulation (`clade_jax.layers.spade_windows`) against the dense convolutions.

The per-class tables at interior pixels plus the convolution at the boundary pixels must give the
dense `conv(ReLU(conv(one_hot(labels) [+ edges])))` and all its gradients, for label maps with
regions, image borders, instance edges (binary and not), invalid labels, several images with
different boundary counts, all-boundary and boundary-free maps, boundary lists longer than one
block; and `SPADE(windows=True)` must equal `SPADE(windows=False)` and actually take the path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clade_jax.layers import spade_windows as sw
from clade_jax.layers.conv import plain_formulation
from clade_jax.layers.spade import SPADE, semantic_input


def _regions(rng, n, h, w, regions, classes):
    """Voronoi label maps: `regions` cells per image, each one random class."""
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((n, h, w), np.int32)
    for b in range(n):
        centres = rng.uniform(0, [h, w], (regions, 2))
        dist = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
        out[b] = rng.integers(0, classes, regions)[dist.argmin(-1)]
    return out


def _interior_numpy(keys, k):
    """Brute force: the (2k-1)^2 window inside the image and all one key >= 0."""
    r = 2 * (k // 2)
    n, h, w = keys.shape
    out = np.zeros(keys.shape, bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if i - r < 0 or j - r < 0 or i + r >= h or j + r >= w or keys[b, i, j] < 0:
                    continue
                out[b, i, j] = (
                    keys[b, i - r : i + r + 1, j - r : j + r + 1] == keys[b, i, j]
                ).all()
    return out


def _dense(actv_in, shared_kernel, shared_bias, kernel, bias, k):
    """The plain formulation: conv(ReLU(conv(inputs) + b_shared)) + b, zero padding k // 2."""
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    actv = jax.nn.relu(conv(actv_in, shared_kernel) + shared_bias)
    return conv(actv, kernel) + bias, actv


def _case(rng, labels, num_classes, edges, k, out):
    """Parameters and the one-hot input of one comparison."""
    inputs = semantic_input(jnp.asarray(labels), num_classes, None if edges is None else edges)
    c_in = inputs.shape[-1]
    hidden = 8
    params = dict(
        shared_kernel=jnp.asarray(rng.normal(0, 0.5, (k, k, c_in, hidden)), jnp.float32),
        shared_bias=jnp.asarray(rng.normal(0, 0.5, hidden), jnp.float32),
        kernel=jnp.asarray(rng.normal(0, 0.3, (k, k, hidden, out)), jnp.float32),
        bias=jnp.asarray(rng.normal(0, 0.3, out), jnp.float32),
    )
    return inputs, params


def _both(labels, num_classes, edges, k, seed=0, out=6):
    """(windowed, dense) outputs and gradients of sum(y * cotangent) for one label map."""
    rng = np.random.default_rng(seed)
    inputs, params = _case(rng, labels, num_classes, edges, k, out)
    keys = sw.uniform_keys(jnp.asarray(labels), num_classes, edges)
    cot = jnp.asarray(rng.normal(size=labels.shape + (out,)), jnp.float32)

    def windowed(p):
        _, actv = _dense(inputs, p["shared_kernel"], p["shared_bias"], p["kernel"], p["bias"], k)
        y = sw.modulation(
            actv, keys, p["shared_kernel"], p["shared_bias"], p["kernel"], p["bias"], num_classes
        )
        return jnp.sum(y * cot), y

    def dense(p):
        y = _dense(inputs, p["shared_kernel"], p["shared_bias"], p["kernel"], p["bias"], k)[0]
        return jnp.sum(y * cot), y

    got = jax.jit(jax.value_and_grad(windowed, has_aux=True))(params)
    want = jax.jit(jax.value_and_grad(dense, has_aux=True))(params)
    return got, want, keys


def _assert_equal(got, want):
    (_, y), grads = got
    (_, y_want), grads_want = want
    scale = float(jnp.abs(y_want).max())
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_want), rtol=0, atol=2e-5 * scale)
    for name in grads_want:
        g, gw = np.asarray(grads[name]), np.asarray(grads_want[name])
        np.testing.assert_allclose(
            g, gw, rtol=0, atol=2e-5 * max(np.abs(gw).max(), 1e-6), err_msg=name
        )


@pytest.fixture
def small_chunks(monkeypatch):
    """Blocks of 16 pixels: the small maps below have boundary lists of many blocks."""
    monkeypatch.setattr(sw, "CHUNK", 16)


def test_interior_matches_a_brute_force_window_check():
    rng = np.random.default_rng(0)
    keys = _regions(rng, 2, 20, 23, 5, 4)
    keys[0, 10, 3] = -1  # an invalid key is never interior, nor are its neighbours
    for k in (3, 5):
        want = _interior_numpy(keys, k)
        got = np.asarray(sw.interior(jnp.asarray(keys), k))
        np.testing.assert_array_equal(got, want)
        assert 0.1 < want.mean() < 0.9  # both kinds of pixel occur


def test_uniform_keys_encode_edges_and_reject_what_has_no_table_row():
    labels = jnp.array([[[0, 1, 2, 3, -1]]])
    edges = jnp.array([[[0.0, 1.0, 0.5, 0.0, 0.0]]])
    keys = np.asarray(sw.uniform_keys(labels, 3, edges))
    np.testing.assert_array_equal(keys, [[[0, 4, -1, -1, -1]]])


@pytest.mark.parametrize("k", [3, 5])
def test_windowed_modulation_equals_the_dense_convolutions(small_chunks, k):
    rng = np.random.default_rng(1)
    labels = _regions(rng, 2, 32, 28, 3, 5)
    labels[1] = _regions(rng, 1, 32, 28, 10, 5)[0]  # another boundary count in the same batch
    got, want, keys = _both(labels, 5, None, k)
    inner = np.asarray(sw.interior(keys, k))
    assert inner[0].any() and inner[1].any() and inner[0].sum() != inner[1].sum()
    assert (~inner).reshape(2, -1).sum(1).min() > 3 * sw.CHUNK  # several blocks per image
    _assert_equal(got, want)


def test_windowed_modulation_with_instance_edges_and_invalid_labels(small_chunks):
    rng = np.random.default_rng(2)
    labels = _regions(rng, 1, 22, 22, 5, 4)
    labels[0, 5:8, 5:8] = 7  # outside [0, 4): a zero one-hot row, no table entry
    edges = np.zeros(labels.shape, np.float32)
    edges[0, 12, :] = 1.0  # an instance boundary across the image
    edges[0, 14:21, 0:12] = 1.0  # a block of edge pixels: keys K + c of interior pixels
    edges[0, 18, 18] = 0.5  # a value the table cannot hold: a boundary pixel for the window
    got, want, keys = _both(labels, 4, jnp.asarray(edges), 3, seed=3)
    inner = np.asarray(sw.interior(keys, 3))
    assert (np.asarray(keys)[inner] >= 4).any() and (np.asarray(keys)[inner] < 4).any()
    _assert_equal(got, want)


@pytest.mark.parametrize("kind", ["uniform", "random"])
def test_windowed_modulation_without_boundaries_or_without_interior(small_chunks, kind):
    rng = np.random.default_rng(4)
    if kind == "uniform":  # interior everywhere but the 2-pixel frame
        labels = np.full((1, 16, 16), 2, np.int32)
    else:  # every pixel its own random class: no interior pixel
        labels = rng.integers(0, 6, (1, 16, 16)).astype(np.int32)
    got, want, keys = _both(labels, 6, None, 3)
    inner = np.asarray(sw.interior(keys, 3))
    assert inner.sum() == (144 if kind == "uniform" else 0)
    _assert_equal(got, want)


def _spade_outputs(windows: bool, labels, edges, plain: bool = False, dtype=jnp.float32):
    layer = SPADE(
        8, 5, "instance", instance_edge=True, windows=windows, dtype=dtype, rngs=nnx.Rngs(0)
    )
    rng = np.random.default_rng(5)
    for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):  # non-zero biases too
        var.set_value(jnp.asarray(rng.normal(0, 0.3, var.shape), jnp.float32))
    x = jnp.asarray(rng.normal(size=labels.shape + (8,)), jnp.float32)
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, jnp.asarray(labels), edges=jnp.asarray(edges))
        return jnp.sum(y * jnp.cos(x)), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if plain:
        with plain_formulation():
            return fn(params, x)
    return fn(params, x)


def test_spade_layer_with_windows_equals_the_plain_layer(monkeypatch, small_chunks):
    monkeypatch.setattr(sw, "MIN_PIXELS", 16 * 16)
    calls = []
    real = sw.modulation
    monkeypatch.setattr(sw, "modulation", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(6)
    labels = _regions(rng, 2, 16, 16, 4, 5)
    edges = np.zeros(labels.shape, np.float32)
    edges[:, 9, 2:12] = 1.0
    (_, y), (gp, gx) = _spade_outputs(True, labels, edges)
    assert len(calls) == 2  # gamma and beta took the windowed path
    (_, y_want), (gp_want, gx_want) = _spade_outputs(False, labels, edges, plain=True)
    assert len(calls) == 2
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_want), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_want), atol=2e-5, rtol=0)
    for (path, g), (_, g_want) in zip(
        nnx.to_flat_state(gp), nnx.to_flat_state(gp_want), strict=True
    ):
        scale = max(float(jnp.abs(g_want[...]).max()), 1e-6)
        np.testing.assert_allclose(
            g[...], g_want[...], atol=2e-5 * scale, rtol=0, err_msg=str(path)
        )


def test_spade_layer_with_windows_in_bfloat16(monkeypatch, small_chunks):
    # The compute dtype reaches the tables, the blocks and their gradients (a float32 gradient
    # of a bfloat16 input would be a custom_vjp error).
    monkeypatch.setattr(sw, "MIN_PIXELS", 16 * 16)
    labels = _regions(np.random.default_rng(7), 1, 16, 16, 3, 5)
    edges = np.zeros(labels.shape, np.float32)
    (_, y), (gp, _) = _spade_outputs(True, labels, edges, dtype=jnp.bfloat16)
    (_, y_want), (gp_want, _) = _spade_outputs(False, labels, edges, dtype=jnp.bfloat16, plain=True)
    y, y_want = np.asarray(y, np.float32), np.asarray(y_want, np.float32)
    np.testing.assert_allclose(y, y_want, atol=0.05 * np.abs(y_want).max(), rtol=0)
    for (path, g), (_, g_want) in zip(
        nnx.to_flat_state(gp), nnx.to_flat_state(gp_want), strict=True
    ):
        g, g_want = np.asarray(g[...], np.float32), np.asarray(g_want[...], np.float32)
        scale = max(np.abs(g_want).max(), 1e-6)
        np.testing.assert_allclose(g, g_want, atol=0.05 * scale, rtol=0, err_msg=str(path))


def test_spade_layer_keeps_the_dense_path_below_min_pixels_or_when_off(monkeypatch):
    calls = []
    real = sw.modulation
    monkeypatch.setattr(sw, "modulation", lambda *a: calls.append(1) or real(*a))
    labels = np.zeros((1, 16, 16), np.int32)
    edges = np.zeros(labels.shape, np.float32)
    _spade_outputs(True, labels, edges)  # 256 pixels < MIN_PIXELS
    monkeypatch.setattr(sw, "MIN_PIXELS", 16 * 16)
    _spade_outputs(False, labels, edges)  # windows off
    assert calls == []


# ------------------------------------------------------------- the trainer's "auto" choice


def test_interior_fraction_counts_uniform_windows_and_never_invalid_labels():
    rng = np.random.default_rng(1)
    labels = _regions(rng, 2, 20, 23, 5, 4)
    labels[1, 5, 5] = 7  # outside the 4 classes: no table row
    keys = np.where(labels < 4, labels, -1)
    want = _interior_numpy(keys, 3).mean()
    assert 0.2 < want < 0.9
    assert sw.interior_fraction(labels, 4) == pytest.approx(want, abs=1e-7)
    assert sw.interior_fraction(np.zeros((1, 9, 9), np.int32), 4) == pytest.approx(25 / 81)
    with pytest.raises(ValueError, match=r"\(N, H, W\).*\(9, 9\)"):
        sw.interior_fraction(np.zeros((9, 9), np.int32), 4)


def _model_config(norm, windows, generator="spade_clade"):
    from clade_jax.configs import synthetic

    config = synthetic.get_config("tiny")
    config.model.norm, config.model.generator = norm, generator
    with config.ignore_type():  # a bool: the field of configs written on 2026-12-02/03
        config.model.spade_windows = windows
    return config


def test_auto_windows_follow_the_interior_fraction_and_only_for_spade():
    from clade_jax.models import build

    t = sw.AUTO_MIN_INTERIOR
    for norm, interior, want in [
        ("spade", t, "on"),
        ("spade", t - 0.01, "off"),
        ("spade", 0.95, "on"),
        ("clade", 0.95, "off"),
    ]:
        config = _model_config(norm, "auto")
        assert build.resolve_spade_windows(config, interior) == want, (norm, interior)
        assert config.model.spade_windows == want
        assert build.spade_windows_enabled(config) is (want == "on")
    config = _model_config("spade", "auto", generator="pix2pixhd")  # no SPADE layer
    assert build.resolve_spade_windows(config, 0.95) == "off"
    for fixed in ("on", "off", True, False):  # an explicit choice stays as it is
        config = _model_config("spade", fixed)
        assert build.resolve_spade_windows(config, 0.0 if fixed in ("on", True) else 1.0) is None
        assert config.model.spade_windows == fixed
        assert build.spade_windows_enabled(config) is (fixed in ("on", True))
    config = _model_config("spade", "auto")
    assert build.spade_windows_enabled(config) is False  # unresolved: the dense path
    config.model.spade_windows = "sometimes"
    with pytest.raises(ValueError, match="spade_windows.*'sometimes'"):
        build.resolve_spade_windows(config, 0.9)


def test_the_built_generator_takes_the_resolved_choice():
    from clade_jax.models import build

    for windows, want in [("on", True), ("off", False), ("auto", False)]:
        gen = build.build_generator(_model_config("spade", windows), rngs=nnx.Rngs(0))
        layers = [m for _, m in nnx.iter_graph(gen) if isinstance(m, SPADE)]
        assert layers and all(m.windows is want for m in layers), windows


class _Batches:
    """An iterator with grain's get_state / set_state over fixed label batches."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    reads = 0

    def __next__(self):
        self.position += 1
        self.reads += 1
        return {"label": self.batches[self.position - 1]}

    def get_state(self):
        return self.position

    def set_state(self, position):
        self.position = position


def test_the_trainer_resolves_auto_from_its_first_batch_and_puts_it_back():
    from clade_jax.training.loop import _resolve_spade_windows

    rng = np.random.default_rng(2)
    blocky = np.repeat(np.repeat(rng.integers(0, 4, (1, 2, 2)), 32, 1), 32, 2)  # 64x64, 4 cells
    noisy = rng.integers(0, 4, (1, 64, 64))  # almost no uniform 5x5 window
    for first, want in [(blocky, "on"), (noisy, "off")]:
        config = _model_config("spade", "auto")
        config.data.num_classes = 4
        batches = _Batches([first, noisy if first is blocky else blocky])
        resolved = _resolve_spade_windows(config, batches)
        assert resolved.model.spade_windows == want
        assert config.model.spade_windows == "auto"  # the caller's config is left alone
        assert batches.position == 0  # the batch it read is read again by the training loop
    config = _model_config("clade", "auto")  # no SPADE layer: "off" without reading a batch
    batches = _Batches([blocky])
    assert _resolve_spade_windows(config, batches).model.spade_windows == "off"
    assert batches.reads == 0
