"""The pix2pixHD baseline generator: official parameter counts, MACs, and layer semantics.

Parameter counts were measured on the official SPADE code (`--netG pix2pixhd --norm_G
spectralinstance`, batch 1) and are matched exactly with `nnx.eval_shape` (nothing allocated).
Reflection padding and the transposed convolution are checked against NumPy references written
from PyTorch's definitions; the transposed conv also against the gradient of a strided conv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clade_jax.evaluation.complexity import layer_counts
from clade_jax.models.build import count_params
from clade_jax.models.pix2pixhd import ConvTranspose2d, Pix2PixHDGenerator, reflect_pad

OFFICIAL = {  # (num_classes, use_instance): parameters of the official Pix2PixHDGenerator
    (151, False): 182_886_019,  # ADE20k
    (183, True): 182_989_507,  # COCO-Stuff (+ edge channel)
    (35, True): 182_525_379,  # Cityscapes (+ edge channel)
}


def closed_form(semantic_nc: int, ngf: int = 64, n_down: int = 4, n_blocks: int = 9) -> int:
    """Parameters from the structure: biases only on the last conv (the others precede a norm)."""
    total = semantic_nc * ngf * 49
    c = ngf
    for _ in range(n_down):
        total += c * 2 * c * 9
        c *= 2
    total += n_blocks * 2 * c * c * 9
    for _ in range(n_down):
        total += c * (c // 2) * 9
        c //= 2
    return total + c * 3 * 49 + 3


@pytest.mark.parametrize("num_classes, instance", list(OFFICIAL))
def test_parameter_counts_equal_the_official_ones(num_classes, instance):
    model = nnx.eval_shape(
        lambda: Pix2PixHDGenerator(num_classes, use_instance=instance, rngs=nnx.Rngs(0))
    )
    assert count_params(model) == OFFICIAL[(num_classes, instance)]
    assert closed_form(num_classes + instance) == OFFICIAL[(num_classes, instance)]


def test_macs_at_256_official_84_8_and_paper_99_3():
    """84.80 G with each transposed-conv input pixel meeting each tap once (the official-code
    measurement); 99.30 G when transposed convs are charged per *output* pixel like a direct conv
    (thop's count_convNd), which is the CLADE paper's Table 3 figure."""
    model = nnx.eval_shape(lambda: Pix2PixHDGenerator(151, rngs=nnx.Rngs(0)))
    model.eval()
    rows = layer_counts(model, {"labels": jax.ShapeDtypeStruct((1, 256, 256), jnp.int32)})
    assert len(rows) == 1 + 4 + 18 + 4 + 1  # in, down, blocks, transposed up, out
    tconv = [getattr(model, f"up_{i}").conv for i in range(4)]
    conv = sum(r.macs for r in rows if r.kind == "conv" and "up_" not in r.path[0])
    sizes = [32, 64, 128, 256]
    t_in = sum(t.macs(s, s)[0] for t, s in zip(tconv, sizes, strict=True))
    t_out = sum(
        s * s * 9 * t.in_features * t.out_features for t, s in zip(tconv, sizes, strict=True)
    )
    assert t_out == 4 * t_in
    assert round((conv + t_in) / 1e9, 2) == 84.80
    assert round((conv + t_out) / 1e9, 1) == 99.3


def test_transposed_conv_macs_match_xla_cost_analysis():
    layer = nnx.eval_shape(lambda: ConvTranspose2d(3, 5, 3, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(layer)
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.ShapeDtypeStruct((1, 8, 6, 3), jnp.float32)
    flops = jax.jit(fn).lower(state, x).cost_analysis()["flops"]
    macs, valid = layer.macs(16, 12)
    assert macs == 8 * 6 * 9 * 3 * 5
    assert flops == 2 * valid + 16 * 12 * 5  # 2 flops per MAC + the bias adds


def _torch_reflect_index(i: int, n: int) -> int:
    """ReflectionPad2d's source index for padded position i (relative to the first pixel)."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def test_reflect_pad_matches_pytorch_definition():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    p = 3
    rows = [_torch_reflect_index(i, 5) for i in range(-p, 5 + p)]
    cols = [_torch_reflect_index(i, 4) for i in range(-p, 4 + p)]
    np.testing.assert_array_equal(
        np.asarray(reflect_pad(jnp.asarray(x), p)), x[:, rows][:, :, cols]
    )


def _scatter_reference(x, w_torch, stride, padding, output_padding):
    """PyTorch's ConvTranspose2d from its definition: x (N,H,W,I), w_torch (I,O,k,k)."""
    n, h, w, _ = x.shape
    k = w_torch.shape[2]
    full_h = (h - 1) * stride + k + output_padding
    full_w = (w - 1) * stride + k + output_padding
    full = np.zeros((n, full_h, full_w, w_torch.shape[1]), np.float64)
    for q in range(h):
        for r in range(w):
            for a in range(k):
                for b in range(k):
                    full[:, q * stride + a, r * stride + b] += x[:, q, r] @ w_torch[:, :, a, b]
    out_h = (h - 1) * stride - 2 * padding + k + output_padding
    out_w = (w - 1) * stride - 2 * padding + k + output_padding
    return full[:, padding : padding + out_h, padding : padding + out_w]


@pytest.mark.parametrize("stride, padding, output_padding", [(2, 1, 1), (2, 0, 0), (3, 1, 2)])
def test_transposed_conv_matches_scatter_reference(stride, padding, output_padding):
    rng = np.random.default_rng(1)
    layer = ConvTranspose2d(
        2,
        3,
        3,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        rngs=nnx.Rngs(0),
    )
    w_torch = rng.normal(size=(2, 3, 3, 3))
    layer.kernel[...] = jnp.asarray(np.transpose(w_torch, (2, 3, 0, 1)), jnp.float32)
    layer.bias[...] = jnp.asarray([0.1, -0.2, 0.3])
    x = rng.normal(size=(2, 4, 5, 2)).astype(np.float32)
    y = np.asarray(layer(jnp.asarray(x)))
    ref = _scatter_reference(x, w_torch, stride, padding, output_padding) + [0.1, -0.2, 0.3]
    assert y.shape == (2, *layer.output_shape(4, 5), 3)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_transposed_conv_is_the_gradient_of_the_strided_conv():
    """ConvTranspose2d(k3, s2, p1, op1) = VJP of Conv2d(k3, s2, p1) with in/out swapped."""
    rng = np.random.default_rng(2)
    layer = ConvTranspose2d(4, 3, 3, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(1, 6, 5, 4)), jnp.float32)  # (N, H, W, in)
    kernel = layer.kernel[...]  # (kh, kw, in, out)

    def conv(y):  # (N, 2H, 2W, out) -> (N, H, W, in)
        return jax.lax.conv_general_dilated(
            y,
            jnp.transpose(kernel, (0, 1, 3, 2)),
            window_strides=(2, 2),
            padding=((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )

    _, vjp = jax.vjp(conv, jnp.zeros((1, 12, 10, 3), jnp.float32))
    np.testing.assert_allclose(layer(x), vjp(x)[0], rtol=1e-5, atol=1e-6)


def test_transposed_conv_spectral_norm_train_and_eval():
    """torch's spectral_norm(ConvTranspose2d) uses dim=1: the matrix is w.permute(1, 0, 2, 3)."""
    layer = ConvTranspose2d(4, 6, 3, spectral_norm=True, rngs=nnx.Rngs(0))
    w_torch = np.transpose(np.asarray(layer.kernel[...]), (2, 3, 0, 1))  # (in, out, k, k)
    w_mat = np.transpose(w_torch, (1, 0, 2, 3)).reshape(6, -1)
    assert layer.u.shape == (6,) and layer.v.shape == (36,)
    u0 = np.asarray(layer.u[...])
    x = jnp.ones((1, 3, 3, 4))
    layer(x)  # training forward: one power iteration, stored
    v1 = w_mat.T @ u0
    v1 /= np.linalg.norm(v1)
    u1 = w_mat @ v1
    u1 /= np.linalg.norm(u1)
    np.testing.assert_allclose(layer.u[...], u1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.v[...], v1, rtol=1e-5, atol=1e-6)

    layer.eval()  # evaluation: stored vectors, nothing updated
    np.testing.assert_allclose(layer.weight(), layer.kernel[...] / (u1 @ w_mat @ v1), rtol=1e-5)
    u, v = np.asarray(layer.u[...]), np.asarray(layer.v[...])
    y0 = layer(x)
    np.testing.assert_array_equal(layer.u[...], u)
    np.testing.assert_array_equal(layer(x), y0)
    np.testing.assert_array_equal(layer.v[...], v)

    layer.train()  # many iterations: sigma -> the largest singular value
    for _ in range(30):
        layer(x)
    top = np.linalg.svd(w_mat, compute_uv=False)[0]
    u, v = layer.u[...], layer.v[...]
    np.testing.assert_allclose(u @ w_mat @ v, top, rtol=1e-4)


def materialize(factory, seed: int = 0):
    """The module `factory()` builds, with NumPy-drawn weights instead of its initialisers.

    Running the real initialisers eagerly compiles one small program per parameter shape (20 s
    on two busy cores for a tiny model); shape and semantics tests need only finite weights.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        x = rng.standard_normal(spec.shape).astype(spec.dtype)
        if next(str(k.key) for k in reversed(path) if hasattr(k, "key")) in ("u", "v"):
            return x / np.linalg.norm(x)
        return 0.1 * x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def compiled(fn, model):
    """`fn(model, *args)` compiled once for `model`'s structure, returning (outputs, new state),
    with XLA's backend optimisation off (it doubles the compile time of these tiny forwards)."""
    graphdef = nnx.graphdef(model)

    def pure(state, *args):
        m = nnx.merge(graphdef, state)
        return fn(m, *args), nnx.state(m)

    jitted = jax.jit(pure, compiler_options={"xla_backend_optimization_level": 0})
    return lambda model, *args: jitted(nnx.state(model), *args)


def test_tiny_forward_shapes_range_eval_and_invalid_labels():
    model = materialize(
        lambda: Pix2PixHDGenerator(
            5, ngf=2, use_instance=True, n_downsample=2, n_blocks=1, rngs=nnx.Rngs(0)
        )
    )
    assert model.output_size == (256, 256)  # nominal; the network is fully convolutional
    rng = np.random.default_rng(0)
    labels = jnp.asarray(rng.integers(0, 5, (2, 12, 8)), jnp.int32)
    instance = jnp.asarray(rng.integers(0, 3, (2, 12, 8)), jnp.int32)
    u = np.asarray(model.conv_in.conv.u[...])
    forward = compiled(lambda m, labels, instance: m(labels, instance=instance), model)
    y, state = forward(model, labels, instance)
    nnx.update(model, state)
    assert y.shape == (2, 12, 8, 3) and y.dtype == jnp.float32
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1)
    assert not np.allclose(model.conv_in.conv.u[...], u)  # training: power iteration ran
    bad = labels.at[0, 0, 0].set(5)
    assert np.isnan(np.asarray(forward(model, bad, instance)[0])[0]).any()
    model.eval()  # stored u, v: deterministic and nothing updated
    forward = compiled(lambda m, labels, instance: m(labels, instance=instance), model)
    (y0, state), (y1, _) = forward(model, labels, instance), forward(model, labels, instance)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(state["conv_in"]["conv"]["u"][...], model.conv_in.conv.u[...])
    with pytest.raises(ValueError, match="instance"):
        model(labels)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(labels[:, :10], instance=instance[:, :10])
