"""The public layers: CLADE against a one-hot reference, ICPE maps, switchable norm, label helpers,
out-of-range labels, and CLADE inside a user's own NNX model under jit with gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from clade_jax.layers import (
    CLADE,
    SPADE,
    ParamFreeNorm,
    SpectralVector,
    check_labels,
    fold_spectral_norm,
    icpe_offsets,
    instance_edges,
    resize_nearest,
    resize_nearest_np,
)
from clade_jax.models import Generator
from clade_jax.models.pix2pixhd import Pix2PixHDGenerator


def _random_inputs(n=2, h=8, w=6, c=5, k=4, seed=0):
    kx, kl = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, h, w, c)) * 3 + 1
    labels = jax.random.randint(kl, (n, h, w), 0, k)
    return x, labels


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_clade_equals_one_hot_einsum_reference(norm):
    x, labels = _random_inputs()
    layer = CLADE(5, 4, norm, rngs=nnx.Rngs(1))
    layer.class_affine.shift[...] = jax.random.normal(jax.random.key(2), (4, 5))
    y = layer(x, labels)
    xf = np.asarray(x, np.float64)
    axes = {"batch": (0, 1, 2), "instance": (1, 2)}.get(norm)
    if axes is None:
        x_hat = xf
    else:
        mean = xf.mean(axis=axes, keepdims=True)
        x_hat = (xf - mean) / np.sqrt(xf.var(axis=axes, keepdims=True) + 1e-5)
    one_hot = np.eye(4)[np.asarray(labels)]  # (N, H, W, K)
    scale = np.einsum("nhwk,kc->nhwc", one_hot, np.asarray(layer.class_affine.scale[...]))
    shift = np.einsum("nhwk,kc->nhwc", one_hot, np.asarray(layer.class_affine.shift[...]))
    np.testing.assert_allclose(np.asarray(y), x_hat * scale + shift, rtol=1e-5, atol=1e-5)


def test_clade_has_no_one_plus_and_spade_has():
    """CLADE: x_hat * w + b. SPADE: x_hat * (1 + gamma) + beta (zero modulation = identity)."""
    x, labels = _random_inputs(c=3, k=2)
    clade = CLADE(3, 2, "none", rngs=nnx.Rngs(0))
    clade.class_affine.scale[...] = jnp.zeros((2, 3))
    np.testing.assert_array_equal(np.asarray(clade(x, labels)), 0.0)
    spade = SPADE(3, 2, "none", rngs=nnx.Rngs(0))
    for conv in (spade.mlp_gamma, spade.mlp_beta):
        conv.kernel[...] = jnp.zeros_like(conv.kernel[...])
    np.testing.assert_allclose(np.asarray(spade(x, labels)), np.asarray(x), rtol=1e-6)


def test_clade_icpe_and_instance_edge_options():
    x, labels = _random_inputs(c=3, k=3)
    p = jax.random.uniform(jax.random.key(5), labels.shape + (2,), minval=-1, maxval=1)
    edges = instance_edges(labels)
    layer = CLADE(3, 3, "none", icpe=True, instance_edge=True, rngs=nnx.Rngs(0))
    y = layer(x, labels, icpe=p, edges=edges)
    assert y.shape == x.shape[:3] + (4,)  # the edge channel is appended
    w = layer.icpe_scale.kernel[...].reshape(2)
    bw = layer.icpe_scale.bias[...][0]
    scale = layer.class_affine.scale[...][labels] * (1 + p @ w + bw)[..., None]
    wb = layer.icpe_shift.kernel[...].reshape(2)
    bb = layer.icpe_shift.bias[...][0]
    shift = layer.class_affine.shift[...][labels] * (1 + p @ wb + bb)[..., None]
    np.testing.assert_allclose(
        np.asarray(y[..., :3]), np.asarray(x * scale + shift), rtol=1e-5, atol=1e-6
    )
    e = layer.inst_conv.kernel[...].reshape(()) * edges + layer.inst_conv.bias[...][0]
    np.testing.assert_allclose(np.asarray(y[..., 3]), np.asarray(e), rtol=1e-6)


def test_out_of_range_labels_give_nan_not_a_silent_clamp():
    x, labels = _random_inputs(k=4)
    labels = labels.at[0, 0, 0].set(4).at[1, 2, 3].set(-1)
    for layer in (
        CLADE(5, 4, "instance", rngs=nnx.Rngs(0)),
        SPADE(5, 4, "instance", rngs=nnx.Rngs(0)),
    ):
        y = np.asarray(layer(x, labels))
        assert np.isnan(y[0, 0, 0]).all() and np.isnan(y[1, 2, 3]).all()
        assert np.isfinite(y[0, 1:]).all()
    g = Generator(4, norm="clade", ngf=2, crop_size=32, rngs=nnx.Rngs(0))
    run = nnx.jit(lambda g, labels: g(labels))
    good = jnp.zeros((2, 32, 32), jnp.int32)
    assert np.isfinite(np.asarray(run(g, good))).all()
    g.eval()  # running statistics: only the example with the bad label is poisoned
    out = np.asarray(run(g, good.at[0, 5, 7].set(255)))
    assert np.isnan(out[0]).any() and np.isfinite(out[1]).all()
    g.train()  # batch statistics spread the NaN through the batch (and the trainer stops)
    assert np.isnan(np.asarray(run(g, good.at[0, 5, 7].set(255)))).all()


def test_check_labels_names_the_source_and_values():
    check_labels(np.array([[0, 1], [2, 2]]), 3, "ok.png")
    with pytest.raises(ValueError, match=r"scene_7\.png.*2 pixels.*\[0, 3\).*3, 255"):
        check_labels(np.array([[0, 255], [3, 2]]), 3, "scene_7.png")
    with pytest.raises(ValueError, match="integer"):
        check_labels(np.zeros((2, 2), np.float32), 3, "x.png")


def _torch_nearest(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PyTorch's legacy nearest rule, written out: src = floor(dst * (in / out)) in float32."""
    h, w = x.shape[1:3]
    rows = np.minimum(np.floor(np.arange(out_h) * np.float32(h / out_h)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(out_w) * np.float32(w / out_w)).astype(int), w - 1)
    return x[:, rows][:, :, cols]


@pytest.mark.parametrize("size", [(2, 2), (8, 8), (5, 7), (64, 64), (128, 96), (13, 64)])
def test_resize_nearest_follows_pytorch_floor_rule(size):
    labels = np.asarray(jax.random.randint(jax.random.key(0), (2, 64, 64), 0, 9))
    ours = np.asarray(resize_nearest(jnp.asarray(labels), size))
    np.testing.assert_array_equal(ours, _torch_nearest(labels, *size))
    np.testing.assert_array_equal(resize_nearest_np(labels[0], size), ours[0])


def test_resize_nearest_differs_from_half_pixel_resize():
    """64 -> 2 picks rows/cols 0 and 32 (floor rule), not 16 and 48 (half-pixel centres)."""
    labels = jnp.arange(64 * 64).reshape(1, 64, 64)
    ours = resize_nearest(labels, (2, 2))
    np.testing.assert_array_equal(np.asarray(ours[0]), [[0, 32], [32 * 64, 32 * 64 + 32]])
    half = jax.image.resize(labels.astype(jnp.float32), (1, 2, 2), "nearest")
    assert not np.array_equal(np.asarray(half), np.asarray(ours))


def test_instance_edges_are_the_official_four_neighbour_map():
    inst = np.array([[[1, 1, 2], [1, 1, 2], [3, 3, 3]]])
    expected = np.array([[[0, 1, 1], [1, 1, 1], [1, 1, 1]]], np.float32)
    np.testing.assert_array_equal(np.asarray(instance_edges(jnp.asarray(inst))), expected)
    np.testing.assert_array_equal(np.asarray(instance_edges(jnp.ones((1, 3, 4)))), 0)


def test_icpe_offsets_on_hand_made_maps():
    # One 1x3 horizontal segment of class 1 and a 3x1 vertical one of class 2, on class 0.
    label = np.zeros((5, 5), np.int64)
    label[1, 1:4] = 1
    label[2:5, 4] = 2
    p = icpe_offsets(label, ignore=(0,))
    assert p.shape == (5, 5, 2) and p.dtype == np.float32
    np.testing.assert_allclose(p[1, 1:4, 1], np.array([-1, 0, 1]) / (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(p[1, 1:4, 0], 0)
    np.testing.assert_allclose(p[2:5, 4, 0], np.array([-1, 0, 1]) / (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(p[2:5, 4, 1], 0)
    assert (p[label == 0] == 0).all()  # the ignored class gets no offsets


def test_icpe_offsets_per_connected_component_and_axis():
    label = np.full((6, 7), 5)
    label[0:2, 0:3] = 1  # component A of class 1: 2x3, centroid (0.5, 1)
    label[4:6, 5:7] = 1  # component B of class 1 (not connected to A): 2x2, centroid (4.5, 5.5)
    p = icpe_offsets(label)
    np.testing.assert_allclose(
        p[0:2, 0:3, 0], np.array([[-0.5] * 3, [0.5] * 3]) / (0.5 + 1e-5), rtol=1e-5
    )
    np.testing.assert_allclose(p[0, 0:3, 1], np.array([-1, 0, 1]) / (1 + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(
        p[4:6, 5:7, 1], np.array([[-0.5, 0.5], [-0.5, 0.5]]) / (0.5 + 1e-5), rtol=1e-5
    )
    # Class 5 is one component (8-connected) with its own centroid; values lie in (-1, 1).
    assert np.abs(p).max() < 1 and np.abs(p[label == 5]).max() > 0.9
    # Diagonal touching pixels belong to one component (8-connectivity, as cv2's default).
    diag = np.zeros((3, 3), np.int64)
    diag[0, 0] = diag[1, 1] = diag[2, 2] = 1
    q = icpe_offsets(diag, ignore=(0,))
    np.testing.assert_allclose(np.diag(q[..., 0]), np.array([-1, 0, 1]) / (1 + 1e-5), rtol=1e-5)


def _switchable_reference(x, mean_w, var_w, use_batch, training, running=None):
    """NumPy float64 transcription of Luo et al.'s SwitchNorm2d forward (without affine)."""
    n, h, w, c = x.shape
    xs = x.reshape(n, h * w, c)
    mean_in = xs.mean(1, keepdims=True)
    var_in = xs.var(1, keepdims=True, ddof=1)
    mean_ln = mean_in.mean(2, keepdims=True)
    temp = var_in + mean_in**2
    var_ln = temp.mean(2, keepdims=True) - mean_ln**2
    sm = lambda v: np.exp(v) / np.exp(v).sum()
    wm, wv = sm(mean_w), sm(var_w)
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if use_batch:
        if training:
            mean_bn = mean_in.mean(0, keepdims=True)
            var_bn = temp.mean(0, keepdims=True) - mean_bn**2
        else:
            mean_bn, var_bn = running
        means.append(mean_bn)
        variances.append(var_bn)
    mean = sum(a * b for a, b in zip(wm, means, strict=True))
    var = sum(a * b for a, b in zip(wv, variances, strict=True))
    return ((xs - mean) / np.sqrt(var + 1e-5)).reshape(n, h, w, c)


@pytest.mark.parametrize("use_batch", [True, False])
def test_switchable_norm_matches_numpy_reference(use_batch):
    x, _ = _random_inputs(n=3, h=4, w=5, c=6)
    norm = ParamFreeNorm(6, "switchable", switchable_batch=use_batch)
    k = 3 if use_batch else 2
    norm.mean_weight[...] = jnp.linspace(-0.5, 0.7, k)
    norm.var_weight[...] = jnp.linspace(0.3, -0.2, k)
    mw, vw = np.asarray(norm.mean_weight[...]), np.asarray(norm.var_weight[...])
    xf = np.asarray(x, np.float64)
    y = norm(x)
    np.testing.assert_allclose(
        np.asarray(y), _switchable_reference(xf, mw, vw, use_batch, True), rtol=1e-4, atol=1e-5
    )
    if use_batch:
        mean_bn = xf.reshape(3, -1, 6).mean(1).mean(0)
        temp = xf.reshape(3, -1, 6).var(1, ddof=1) + xf.reshape(3, -1, 6).mean(1) ** 2
        var_bn = temp.mean(0) - mean_bn**2
        np.testing.assert_allclose(np.asarray(norm.running_mean[...]), 0.1 * mean_bn, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(norm.running_var[...]), 0.1 * var_bn, rtol=1e-5)
        norm.use_running_average = True
        running = (
            np.asarray(norm.running_mean[...]).reshape(1, 1, 6),
            np.asarray(norm.running_var[...]).reshape(1, 1, 6),
        )
        np.testing.assert_allclose(
            np.asarray(norm(x)),
            _switchable_reference(xf, mw, vw, True, False, running),
            rtol=1e-4,
            atol=1e-5,
        )
    else:
        assert not hasattr(norm, "running_mean")


def test_batch_norm_running_statistics_and_eval():
    x, _ = _random_inputs(n=4, h=3, w=3, c=2)
    norm = ParamFreeNorm(2, "batch")
    norm(x)
    xf = np.asarray(x, np.float64).reshape(-1, 2)
    np.testing.assert_allclose(np.asarray(norm.running_mean[...]), 0.1 * xf.mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(norm.running_var[...]), 0.9 + 0.1 * xf.var(0, ddof=1), rtol=1e-5
    )
    norm.eval()
    rm, rv = np.asarray(norm.running_mean[...]), np.asarray(norm.running_var[...])
    np.testing.assert_allclose(
        np.asarray(norm(x)), (np.asarray(x) - rm) / np.sqrt(rv + 1e-5), rtol=1e-5, atol=1e-6
    )


class UserModel(nnx.Module):
    """A small model of a user's own, with CLADE as its normalization."""

    def __init__(self, num_classes, *, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = CLADE(8, num_classes, "instance", rngs=rngs)
        self.out = nnx.Conv(8, 3, (1, 1), rngs=rngs)

    def __call__(self, x, labels):
        return self.out(jax.nn.relu(self.norm(self.conv(x), labels)))


def test_clade_inside_a_user_model_under_jit_trains_its_class_tables():
    model = UserModel(5, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    labels = jax.random.randint(jax.random.key(2), (2, 4, 4), 0, 3)  # resized inside CLADE
    target = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))

    @nnx.jit
    def step(model, opt, x, labels, target):
        loss_fn = lambda m: jnp.mean((m(x, labels) - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    before = np.asarray(model.norm.class_affine.scale[...]).copy()
    loss0, grads = step(model, opt, x, labels, target)
    g = np.asarray(grads["norm"]["class_affine"]["scale"][...])
    assert np.abs(g[:3]).sum() > 0  # present classes receive gradient
    np.testing.assert_array_equal(g[3:], 0)  # absent classes do not
    for _ in range(20):
        loss, _ = step(model, opt, x, labels, target)
    assert float(loss) < float(loss0)
    assert not np.allclose(np.asarray(model.norm.class_affine.scale[...])[:3], before[:3])


def _recondition(model: nnx.Module, seed: int = 42) -> None:
    """Kernels ~ N(0, 1 / fan_in): activations of order 1 through the whole network. At the
    official init (xavier, gain 0.02) the generator's output is ~1e-4, too small for a bound on
    the bf16 error to mean anything (an all-zero output would be within it)."""
    key = jax.random.key(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "kernel":
            key, sub = jax.random.split(key)
            var.set_value(jax.random.normal(sub, var.shape) / np.sqrt(np.prod(var.shape[:-1])))


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
    labels = jax.random.randint(jax.random.key(0), (2, 64, 64), 0, 4)
    forward = nnx.jit(lambda m, x: m(x))
    g = Generator(4, norm="clade", ngf=2, crop_size=64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    _recondition(g)
    out = forward(g, labels)
    assert out.dtype == jnp.float32 and out.shape == (2, 64, 64, 3)
    assert np.isfinite(np.asarray(out)).all()
    params = jax.tree.leaves(nnx.state(g, nnx.Param))
    stats = jax.tree.leaves(nnx.state(g, nnx.BatchStat))
    assert all(p.dtype == jnp.float32 for p in params + stats)
    f32 = Generator(4, norm="clade", ngf=2, crop_size=64, rngs=nnx.Rngs(0))
    _recondition(f32)
    ref = np.asarray(forward(f32, labels), np.float64)
    # A well-conditioned reference: outputs of order 0.2, almost none saturated by the tanh.
    assert np.abs(ref).mean() > 0.1 and (np.abs(ref) > 0.99).mean() < 0.01
    err = np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref)
    # bf16 keeps 8 significant bits (relative rounding 2^-9): ~1.6% after the whole network;
    # a zero (or otherwise wrong) output is off by ~100%, a float32 one by ~1e-7.
    assert 1e-4 < err < 0.05, err
    # The running statistics moved, computed in float32 from the bf16 activations: they agree
    # with the float32 model's to bf16 precision.
    bf = np.asarray(g.head_0.norm_0.param_free_norm.running_var[...])
    fl = np.asarray(f32.head_0.norm_0.param_free_norm.running_var[...])
    assert np.abs(fl - 1.0).max() > 1e-2  # moved away from their initial value
    np.testing.assert_allclose(bf, fl, rtol=0.05)


@pytest.mark.parametrize("kind", ["clade", "pix2pixhd"])
def test_fold_spectral_norm_keeps_the_eval_outputs(kind):
    """Folding W / sigma into the kernels (inference) gives the eval forward's outputs, drops u, v
    from the folded copy only, and refuses a training-mode module."""
    if kind == "clade":
        g = Generator(4, norm="clade", ngf=2, crop_size=64, rngs=nnx.Rngs(0))
    else:  # transposed convolutions too
        g = Pix2PixHDGenerator(4, ngf=2, n_downsample=2, n_blocks=1, rngs=nnx.Rngs(0))
    labels = jax.random.randint(jax.random.key(1), (2, 64, 64), 0, 4)
    forward = nnx.jit(lambda m, x: m(x))
    for _ in range(3):  # power iterations move u, v away from their initial values
        forward(g, labels)
    with pytest.raises(ValueError, match="evaluation-mode"):
        fold_spectral_norm(g)
    g.eval()
    n_vectors = len(jax.tree.leaves(nnx.state(g, SpectralVector)))
    assert n_vectors > 0
    ref = np.asarray(forward(g, labels))
    folded = fold_spectral_norm(g)
    assert not jax.tree.leaves(nnx.state(folded, SpectralVector))
    assert len(jax.tree.leaves(nnx.state(g, SpectralVector))) == n_vectors  # original untouched
    out = np.asarray(forward(folded, labels))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    # The original keeps its un-normalized kernels (weight_orig); the copy holds W / sigma.
    before, after = nnx.state(g, nnx.Param), nnx.state(folded, nnx.Param)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert any(jax.tree.leaves(changed))
