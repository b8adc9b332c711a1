"""`conv2d`'s tap-wise weight gradient (the XLA:CPU fast path) against XLA's own autodiff.

The custom backward must give the same input and weight gradients as the plain convolution for
every stride / kernel / padding / odd size, in float32 and bfloat16; `weight_grad="auto"` must
take it only on CPU and only where `taps_weight_grad_wins`; the tap-wise (stride 1) and
phase-wise (strided) input gradients must equal XLA's and an independent NumPy sum and be taken
only where `input_grad_formulation` says; and a whole discriminator on the fast paths must have
the same weight gradients and the same gradient with respect to its input image as on the plain
path.
"""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from clade_jax.layers import conv as conv_lib
from clade_jax.models.discriminator import MultiscaleDiscriminator


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _grads(mode, x, w, stride, padding, g):
    def f(x_, w_):
        y = conv_lib.conv2d(x_, w_, stride=stride, padding=padding, weight_grad=mode)
        return jnp.sum(y.astype(jnp.float32) * g)

    return jax.grad(f, argnums=(0, 1))(x, w)


@pytest.mark.parametrize(
    "n,h,w,c,o,k,stride,padding",
    [
        (2, 9, 9, 5, 7, 4, 1, 2),  # the discriminator's stride-1 kernel-4 layers
        (2, 11, 10, 5, 7, 4, 2, 2),  # its stride-2 layers, odd sizes
        (1, 8, 8, 6, 4, 3, 1, 1),  # the generator's 3x3 convs
        (3, 7, 9, 4, 5, 1, 1, 0),  # 1x1
        (1, 10, 10, 3, 2, 3, 2, 0),  # no padding, stride 2
        (2, 6, 6, 3, 3, 5, 1, 3),  # padding larger than half the kernel
    ],
)
def test_taps_weight_grad_equals_xla(n, h, w, c, o, k, stride, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
    y = conv_lib.conv2d(x, kern, stride=stride, padding=padding, weight_grad="xla")
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    y_taps = conv_lib.conv2d(x, kern, stride=stride, padding=padding, weight_grad="taps")
    np.testing.assert_array_equal(np.asarray(y_taps), np.asarray(y))  # same forward op
    dx_ref, dw_ref = _grads("xla", x, kern, stride, padding, g)
    dx, dw = _grads("taps", x, kern, stride, padding, g)
    assert _rel(dx, dx_ref) < 1e-6
    assert _rel(dw, dw_ref) < 1e-5
    # and against an independent NumPy sum over the taps
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    expect = np.zeros((k, k, c, o))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
            expect[i, j] = np.einsum("nhwc,nhwo->co", patch[:, :ho, :wo], np.asarray(g))
    assert _rel(dw, expect) < 1e-5
    if stride == 1:  # the row-shift form: same gradients, and its own forward is the plain one
        y_rows = conv_lib.conv2d(x, kern, stride=1, padding=padding, weight_grad="rows")
        np.testing.assert_array_equal(np.asarray(y_rows), np.asarray(y))
        dx_rows, dw_rows = _grads("rows", x, kern, stride, padding, g)
        assert _rel(dx_rows, dx_ref) < 1e-6
        assert _rel(dw_rows, expect) < 1e-5
        # the im2col-block form: also with several blocks (one output row each)
        for block in (conv_lib.PATCHES_BLOCK_ELEMENTS, 1):
            with pytest.MonkeyPatch.context() as m:
                m.setattr(conv_lib, "PATCHES_BLOCK_ELEMENTS", block)
                dx_p, dw_p = _grads("patches", x, kern, stride, padding, g)
            assert _rel(dx_p, dx_ref) < 1e-6
            assert _rel(dw_p, expect) < 1e-5
    else:
        for mode in ("rows", "patches"):
            with pytest.raises(ValueError, match="stride 1"):
                conv_lib.conv2d(x, kern, stride=stride, padding=padding, weight_grad=mode)


def test_taps_weight_grad_in_bfloat16():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 16)), jnp.bfloat16)
    kern = jnp.asarray(rng.standard_normal((4, 4, 16, 8)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 10, 10, 8)), jnp.float32)
    dx_ref, dw_ref = _grads("xla", x, kern, 1, 2, g)
    dx, dw = _grads("taps", x, kern, 1, 2, g)
    assert dw.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    assert _rel(dx, dx_ref) < 1e-2
    assert _rel(dw, dw_ref) < 1e-2
    assert float(jnp.max(jnp.abs(dw.astype(jnp.float32)))) > 0.1  # not a zero gradient


@pytest.mark.parametrize(
    "n,h,w,c,o,k,padding",
    [
        (1, 6, 6, 5, 7, 3, 1),  # the generator's 3x3 convolutions
        (2, 5, 7, 4, 3, 3, 0),  # unpadded (pix2pixHD's reflection-padded blocks), odd sizes
        (1, 6, 5, 3, 4, 5, 2),  # 5x5
        (2, 4, 4, 3, 2, 4, 2),  # an even kernel with the discriminator's padding
        (1, 5, 5, 2, 3, 3, 2),  # padding k - 1
    ],
)
def test_taps_input_grad_equals_xla_and_a_numpy_sum(n, h, w, c, o, k, padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
    y, vjp = jax.vjp(lambda x_: conv_lib._plain_conv(x_, kern, 1, padding), x)  # noqa: SLF001
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx = conv_lib.taps_input_grad(g, kern, padding)
    assert dx.shape == x.shape and dx.dtype == jnp.float32
    assert _rel(dx, vjp(g)[0]) < 1e-6
    # independently: scatter each output pixel's g @ W[i, j]^T back onto the input it read
    ho, wo = y.shape[1], y.shape[2]
    expect = np.zeros((n, h + 2 * padding, w + 2 * padding, c))
    gn, kn = np.asarray(g, np.float64), np.asarray(kern, np.float64)
    for i in range(k):
        for j in range(k):
            expect[:, i : i + ho, j : j + wo] += np.einsum("nhwo,co->nhwc", gn, kn[i, j])
    expect = expect[:, padding : padding + h, padding : padding + w]
    assert _rel(dx, expect) < 1e-6
    # bfloat16 in, bfloat16 out (accumulated in float32)
    dx16 = conv_lib.taps_input_grad(g.astype(jnp.bfloat16), kern.astype(jnp.bfloat16), padding)
    assert dx16.dtype == jnp.bfloat16 and _rel(dx16, expect) < 1e-2


@pytest.mark.parametrize(
    "n,h,w,c,o,k,stride,padding",
    [
        (2, 11, 10, 5, 7, 4, 2, 2),  # the discriminator's stride-2 layers, odd sizes
        (2, 8, 8, 3, 5, 4, 2, 2),  # even sizes
        (1, 9, 9, 3, 4, 3, 2, 1),  # the encoders' 3x3 stride-2 convolutions
        (1, 10, 10, 3, 2, 3, 2, 0),  # no padding
        (1, 7, 9, 2, 3, 1, 2, 0),  # a kernel smaller than the stride: some phases get nothing
        (1, 12, 12, 2, 3, 5, 3, 2),  # stride 3
        (1, 6, 6, 2, 2, 3, 1, 1),  # stride 1: one phase, the flipped kernel
    ],
)
def test_phases_input_grad_equals_xla_and_a_numpy_sum(n, h, w, c, o, k, stride, padding):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, c, o)), jnp.float32)
    conv = lambda x_: conv_lib._plain_conv(x_, kern, stride, padding)  # noqa: SLF001
    y, vjp = jax.vjp(conv, x)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx = conv_lib.phases_input_grad(g, kern, stride, padding, (h, w))
    assert dx.shape == x.shape and dx.dtype == jnp.float32
    assert _rel(dx, vjp(g)[0]) < 1e-6
    # independently: each output pixel's g @ W[i, j]^T added onto the input pixel it read
    ho, wo = y.shape[1], y.shape[2]
    s = stride
    expect = np.zeros((n, h + 2 * padding + s * k, w + 2 * padding + s * k, c))
    gn, kn = np.asarray(g, np.float64), np.asarray(kern, np.float64)
    for i in range(k):
        for j in range(k):
            term = np.einsum("nhwo,co->nhwc", gn, kn[i, j])
            expect[:, i : i + s * ho : s, j : j + s * wo : s] += term
    expect = expect[:, padding : padding + h, padding : padding + w]
    assert _rel(dx, expect) < 1e-6


def test_taps_input_grad_rejects_a_padding_it_cannot_invert():
    g, kern = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="padding"):
        conv_lib.taps_input_grad(g, kern, 3)


def test_auto_takes_the_taps_input_gradient_on_small_grids_with_wide_kernels(monkeypatch):
    rule = conv_lib.taps_input_grad_wins
    assert rule((1, 8, 8, 1024), (3, 3, 1024, 1024), 1, 1)  # SPADE / CLADE's head_0
    assert rule((1, 16, 16, 1024), (3, 3, 1024, 1024), 1, 1)  # G_middle
    assert rule((1, 18, 18, 1024), (3, 3, 1024, 1024), 1, 0)  # pix2pixHD's residual blocks
    assert rule((2, 16, 16, 512), (3, 3, 512, 512), 1, 1)
    assert not rule((1, 32, 32, 1024), (3, 3, 1024, 1024), 1, 1)  # the grid: XLA's own wins
    assert not rule((4, 16, 16, 1024), (3, 3, 1024, 1024), 1, 1)  # (over the whole batch)
    assert not rule((1, 16, 16, 1024), (1, 1, 1024, 1024), 1, 0)  # 1x1
    assert not rule((1, 16, 16, 1024), (3, 3, 1024, 1024), 2, 1)  # stride 2
    assert not rule((1, 16, 16, 128), (3, 3, 128, 1024), 1, 1)  # narrow input
    assert not rule((1, 8, 8, 1024), (3, 3, 1024, 1024), 1, 3)  # padding beyond k - 1

    kern = jnp.asarray(np.random.default_rng(3).standard_normal((3, 3, 512, 512)) * 0.02)
    cases = (((1, 8, 8, 512), (1, 8, 8, 512), True), ((1, 32, 32, 512), (1, 32, 32, 512), False))
    _check_auto_input_grad(monkeypatch, "taps_input_grad", cases, kern, 1, 1)


def test_auto_takes_the_phases_input_gradient_for_strided_convolutions_of_large_inputs(
    monkeypatch,
):
    rule = conv_lib.phases_input_grad_wins
    assert rule((2, 128, 128, 154), (4, 4, 154, 64), 2, 2)  # D's second scale, first layer
    assert rule((2, 129, 129, 64), (4, 4, 64, 128), 2, 2)
    assert rule((1, 256, 256, 64), (3, 3, 64, 128), 2, 1)  # an encoder's 3x3 stride 2
    assert not rule((2, 256, 256, 3), (4, 4, 3, 64), 2, 2)  # the image channels
    assert not rule((2, 33, 33, 128), (4, 4, 128, 256), 2, 2)  # a small input
    assert not rule((2, 129, 129, 64), (4, 4, 64, 128), 1, 2)  # stride 1
    assert not rule((2, 129, 129, 64), (1, 1, 64, 128), 2, 0)  # a kernel smaller than the stride
    assert conv_lib.input_grad_formulation((1, 8, 8, 1024), (3, 3, 1024, 1024), 1, 1) == "taps"
    assert conv_lib.input_grad_formulation((2, 129, 129, 64), (4, 4, 64, 128), 2, 2) == "phases"
    assert conv_lib.input_grad_formulation((2, 33, 33, 128), (4, 4, 128, 256), 2, 2) == "xla"

    kern = jnp.asarray(np.random.default_rng(5).standard_normal((4, 4, 64, 8)) * 0.05)
    cases = (  # inputs of 4 MiB and 256 KiB
        ((1, 128, 128, 64), (1, 65, 65, 8), True),
        ((1, 32, 32, 64), (1, 17, 17, 8), False),
    )
    _check_auto_input_grad(monkeypatch, "phases_input_grad", cases, kern, 2, 2)


def _check_auto_input_grad(monkeypatch, name, cases, kern, stride, padding):
    """`conv2d(weight_grad="auto")`'s CPU backward calls `conv_lib.<name>` exactly for the
    cases marked so, with XLA's gradients, and never off CPU.
    cases: ((x shape, output-gradient shape, whether it is used), ...)."""
    calls = []
    original = getattr(conv_lib, name)
    monkeypatch.setattr(conv_lib, name, lambda *a: calls.append(1) or original(*a))
    rng = np.random.default_rng(7)
    for x_shape, g_shape, used in cases:
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        g = jnp.asarray(rng.standard_normal(g_shape), jnp.float32)
        calls.clear()
        dx, dw = _grads("auto", x, kern, stride, padding, g)
        assert bool(calls) == used, x_shape
        dx_ref, dw_ref = _grads("xla", x, kern, stride, padding, g)
        assert _rel(dx, dx_ref) < 1e-6 and _rel(dw, dw_ref) < 1e-5
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    calls.clear()
    _grads("auto", jnp.zeros(cases[0][0]), kern, stride, padding, jnp.ones(()))
    assert not calls  # the ordinary autodiff on GPU / TPU


def test_discriminator_input_gradient_equal_with_and_without_the_fast_path(monkeypatch):
    """The gradient that the G step sends through D into the fake image: with every strided
    layer's input gradient in phases (the input-size threshold lowered to 0) as with XLA's."""
    rng = np.random.default_rng(6)
    labels = jnp.asarray(rng.integers(0, 5, (2, 40, 40)), jnp.int32)
    image = jnp.asarray(rng.uniform(-1, 1, (2, 40, 40, 3)), jnp.float32)
    d = MultiscaleDiscriminator(5, ndf=64, n_layers=4, num_D=2, rngs=nnx.Rngs(0))
    d.eval()  # the stored spectral-norm vectors: no state written under the gradient's trace
    calls = []
    original = conv_lib.phases_input_grad
    monkeypatch.setattr(
        conv_lib, "phases_input_grad", lambda *a: calls.append(a[1].shape) or original(*a)
    )
    monkeypatch.setattr(conv_lib, "LATE_INPUT_BYTES", 0)

    def loss(im):
        feats = d(labels, im)
        return sum(jnp.mean(f[-1]) + sum(jnp.mean(jnp.abs(x)) for x in f[:-1]) for f in feats)

    fast = jax.grad(loss)(image)
    # the 64 -> 128 and 128 -> 256 stride-2 layers of both scales (the first layers' inputs
    # have fewer than 16 channels)
    assert sorted(calls) == [(4, 4, 64, 128)] * 2 + [(4, 4, 128, 256)] * 2
    with conv_lib.plain_formulation():
        plain = jax.grad(loss)(image)
    assert float(jnp.max(jnp.abs(plain))) > 0
    assert _rel(fast, plain) < 1e-5


def _uses_taps(monkeypatch, fn, *args) -> bool:
    """Whether differentiating `fn` forms a weight gradient with `taps_weight_grad`."""
    calls = []
    original = conv_lib.taps_weight_grad
    with monkeypatch.context() as m:
        m.setattr(conv_lib, "taps_weight_grad", lambda *a: calls.append(1) or original(*a))
        jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(fn(x, w)), argnums=1))(*args)
    return bool(calls)


def test_auto_takes_the_taps_path_only_on_cpu_and_only_where_it_wins(monkeypatch):
    wide = (jnp.zeros((2, 17, 17, 256)), jnp.zeros((4, 4, 256, 512)))
    conv = lambda s: lambda x, w: conv_lib.conv2d(x, w, stride=s, padding=2)
    assert jax.default_backend() == "cpu"
    assert _uses_taps(monkeypatch, conv(1), *wide)
    assert not _uses_taps(monkeypatch, conv(2), *wide)  # stride 2: XLA's own
    narrow = (jnp.zeros((2, 17, 17, 64)), jnp.zeros((4, 4, 64, 128)))
    assert not _uses_taps(monkeypatch, conv(1), *narrow)
    big_grid = (jnp.zeros((1, 64, 64, 256)), jnp.zeros((3, 3, 256, 512)))
    assert not _uses_taps(monkeypatch, conv(1), *big_grid)
    assert _uses_taps(
        monkeypatch, lambda x, w: conv_lib.conv2d(x, w, padding=2, weight_grad="taps"), *narrow
    )
    # big grids, stride 1, output no wider than the input: the row-shift form
    rows_grid = (jnp.zeros((1, 64, 64, 256)), jnp.zeros((3, 3, 256, 128)))
    calls = []
    original = conv_lib.rows_weight_grad
    with monkeypatch.context() as m:
        m.setattr(conv_lib, "rows_weight_grad", lambda *a: calls.append(1) or original(*a))
        for shapes, s in ((rows_grid, 1), (rows_grid, 2), (big_grid, 1)):  # only the first
            jax.make_jaxpr(jax.grad(lambda x, w, s=s: jnp.sum(conv(s)(x, w)), argnums=1))(*shapes)
        assert calls == [1]
    assert conv_lib.weight_grad_formulation((1, 64, 64, 256), (3, 3, 256, 128), 1) == "rows"
    assert conv_lib.weight_grad_formulation((1, 64, 64, 256), (3, 3, 256, 512), 1) == "xla"
    # SPADE's modulation convolutions (128 input channels) on 64x64 and larger grids: im2col
    # blocks; not for wide inputs, narrow outputs, stride 2 or small grids
    formulation = conv_lib.weight_grad_formulation
    assert formulation((1, 256, 256, 128), (3, 3, 128, 64), 1) == "patches"
    assert formulation((1, 64, 64, 128), (3, 3, 128, 512), 1) == "patches"
    assert formulation((1, 256, 256, 64), (3, 3, 64, 64), 1) == "patches"
    assert formulation((1, 256, 256, 64), (3, 3, 64, 3), 1) == "rows"
    assert formulation((1, 64, 64, 64), (3, 3, 64, 64), 1) == "rows"
    assert formulation((1, 128, 128, 256), (3, 3, 256, 128), 1) == "rows"
    assert formulation((1, 256, 256, 128), (3, 3, 128, 128), 2) == "xla"
    calls = []
    original = conv_lib.patches_weight_grad
    with monkeypatch.context() as m:
        m.setattr(conv_lib, "patches_weight_grad", lambda *a: calls.append(1) or original(*a))
        spade_mod = (jnp.zeros((1, 64, 64, 128)), jnp.zeros((3, 3, 128, 256)))
        jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(conv_lib.conv2d(x, w, padding=1)), argnums=1))(
            *spade_mod
        )
        assert calls == [1]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not _uses_taps(monkeypatch, conv(1), *wide)  # the ordinary path on GPU / TPU
    with pytest.raises(ValueError, match="weight_grad"):
        conv_lib.conv2d(*narrow, weight_grad="fast")


def test_discriminator_gradients_equal_with_and_without_the_fast_path(monkeypatch):
    """ndf 64 at 40x40: the stride-1 256 -> 512 layer (5x5 grid) takes the taps path."""
    rng = np.random.default_rng(2)
    labels = jnp.asarray(rng.integers(0, 5, (2, 40, 40)), jnp.int32)
    image = jnp.asarray(rng.uniform(-1, 1, (2, 40, 40, 3)), jnp.float32)
    taps_calls = []
    original = conv_lib.taps_weight_grad
    monkeypatch.setattr(
        conv_lib,
        "taps_weight_grad",
        lambda x, g, *a: taps_calls.append((a[0], x.shape[-1], g.shape[-1])) or original(x, g, *a),
    )

    def loss(model):
        feats = model(labels, image)
        return sum(jnp.mean(f[-1]) + sum(jnp.mean(jnp.abs(x)) for x in f[:-1]) for f in feats)

    def grads():
        d = MultiscaleDiscriminator(5, ndf=64, n_layers=4, num_D=2, rngs=nnx.Rngs(0))
        return nnx.to_flat_state(nnx.grad(loss)(d))

    fast = grads()
    assert taps_calls == [(4, 256, 512)] * 2  # one per scale
    with conv_lib.plain_formulation():  # XLA's own autodiff of every convolution
        plain = grads()
    assert len(taps_calls) == 2
    assert len(fast) == len(plain) > 0
    for (path, a), (_, b) in zip(fast, plain, strict=True):
        assert _rel(a[...], b[...]) < 1e-5, path


@pytest.mark.parametrize("invalid", ["zero", "nan"])
@pytest.mark.parametrize(
    "k,stride,padding", [(3, 1, 1), (4, 2, 2), (4, 1, 2), (7, 1, 0), (1, 1, 0)]
)
def test_onehot_gather_equals_the_onehot_convolution(invalid, k, stride, padding):
    rng = np.random.default_rng(3)
    num = 6
    labels = rng.integers(0, num, (2, 11, 9))
    labels[0, 3, 4] = num  # == num_classes: not a class (nor the padding row)
    labels[1, 7, 1] = -1
    labels = jnp.asarray(labels, jnp.int32)
    w = jnp.asarray(rng.standard_normal((k, k, num, 5)), jnp.float32)

    def run(method, w_):
        return conv_lib.onehot_conv(
            labels, w_, stride=stride, padding=padding, invalid=invalid, method=method
        )

    ref, got = run("conv", w), run("gather", w)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(ref).any() == (invalid == "nan")
    finite = ~np.isnan(np.asarray(ref))
    np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(ref)[finite], atol=1e-5)
    if invalid == "zero":
        g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
        dw_ref = jax.grad(lambda w_: jnp.sum(run("conv", w_) * g))(w)
        dw = jax.grad(lambda w_: jnp.sum(run("gather", w_) * g))(w)
        assert _rel(dw, dw_ref) < 1e-6
    assert "gather" in str(jax.make_jaxpr(lambda w_: run("auto", w_))(w))


def test_onehot_auto_is_the_plain_convolution_off_cpu(monkeypatch):
    labels = jnp.zeros((1, 4, 4), jnp.int32)
    w = jnp.ones((3, 3, 5, 2))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    jaxpr = str(jax.make_jaxpr(lambda w_: conv_lib.onehot_conv(labels, w_, padding=1))(w))
    assert "conv_general_dilated" in jaxpr and "gather" not in jaxpr
    with pytest.raises(ValueError, match="method"):
        conv_lib.onehot_conv(labels, w, method="fast")


def test_plain_formulation_turns_both_fast_paths_off(monkeypatch):
    labels = jnp.zeros((1, 4, 4), jnp.int32)
    w = jnp.ones((3, 3, 5, 2))
    wide = (jnp.zeros((2, 17, 17, 256)), jnp.zeros((4, 4, 256, 512)))
    onehot = lambda w_: conv_lib.onehot_conv(labels, w_, padding=1)
    with conv_lib.plain_formulation():
        assert "gather" not in str(jax.make_jaxpr(onehot)(w))
        assert not _uses_taps(monkeypatch, lambda x, k: conv_lib.conv2d(x, k, padding=2), *wide)
        plain = jax.make_jaxpr(lambda x, k: conv_lib.conv2d(x, k, padding=2))(*wide)
        assert "custom_vjp_call" not in str(plain)  # nor the late-kernel backward
    # restored on exit (fresh functions: jax caches the traces of the ones above)
    assert "gather" in str(jax.make_jaxpr(lambda w_: conv_lib.onehot_conv(labels, w_))(w))
    assert _uses_taps(monkeypatch, lambda x, k: conv_lib.conv2d(x, k, padding=2, stride=1), *wide)
    narrow = jax.make_jaxpr(lambda x, k: conv_lib.conv2d(x, k, stride=2))(*wide)
    assert "custom_vjp_call" in str(narrow)  # big CPU kernels: the late-kernel backward
    # small kernels and inputs with XLA's own filter gradient: the plain convolution
    c = int(np.sqrt(conv_lib.LATE_KERNEL_BYTES / 4 / 9))  # 3x3 c -> c float32 just under it
    side = int(np.sqrt(conv_lib.LATE_INPUT_BYTES / 4 / 8))  # (1, side, side, 8) just under it
    for x_shape, w_shape, custom in (
        ((1, 8, 8, c), (3, 3, c, c), False),
        ((1, 8, 8, c + 1), (3, 3, c + 1, c + 1), True),
        ((1, side, side, 8), (1, 1, 8, 8), False),  # 1x1: XLA's own filter gradient
        ((1, side + 1, side + 1, 8), (1, 1, 8, 8), True),
    ):
        x, k = jnp.zeros(x_shape), jnp.zeros(w_shape)
        jaxpr = str(jax.make_jaxpr(lambda x, k: conv_lib.conv2d(x, k, padding=0))(x, k))
        assert ("custom_vjp_call" in jaxpr) == custom, (x_shape, w_shape)


def test_after_keeps_the_values_and_adds_a_dependency():
    """`after(v, a)` is v exactly (signed zeros aside), whatever a holds, and depends on a."""
    v = jnp.asarray([1.5, -2.0, 3e38, -1e-30], jnp.float32)
    a = jnp.asarray([[-7.0, jnp.nan]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(conv_lib.after(v, a)), np.asarray(v))
    assert "mul" in str(jax.make_jaxpr(conv_lib.after)(v, a))
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        np.testing.assert_array_equal(np.asarray(conv_lib.after(v, jnp.asarray([bad]))), v)
    # the compiled program keeps the dependency (XLA does not fold 0 * a for floats)
    hlo = jax.jit(conv_lib.after).lower(v, a).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    assert re.search(r"= f32\[4\]\S* fusion\([^)]*%anchor", entry), entry  # not folded away


@pytest.mark.parametrize("spectral", [False, True])
def test_conv2d_with_labels_equals_the_concatenated_input(spectral):
    rng = np.random.default_rng(4)
    conv = conv_lib.Conv2d(
        7 + 2, 4, 3, padding=1, spectral_norm=spectral, use_bias=True, rngs=nnx.Rngs(1)
    )
    conv.bias.set_value(jnp.arange(4.0))
    labels = jnp.asarray(rng.integers(0, 7, (2, 6, 5)), jnp.int32)
    rest = jnp.asarray(rng.standard_normal((2, 6, 5, 2)), jnp.float32)
    x = jnp.concatenate([jax.nn.one_hot(labels, 7), rest], axis=-1)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        a = nnx.clone(conv)
        b = nnx.clone(conv)
        ref = a(x)
        got = b(rest, labels=labels, num_classes=7)
        assert _rel(got, ref) < 1e-6, mode
        if spectral and mode == "train":  # one power iteration each, the same vectors
            assert _rel(b.u[...], a.u[...]) < 1e-6
    with pytest.raises(ValueError, match="input channels"):
        conv(rest, labels=labels, num_classes=6)


def test_discriminator_forward_equals_the_official_concatenated_forward():
    d = MultiscaleDiscriminator(5, use_instance=True, ndf=8, n_layers=3, num_D=3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(5)
    labels = jnp.asarray(rng.integers(0, 5, (2, 24, 24)), jnp.int32)
    instance = jnp.asarray(rng.integers(0, 3, (2, 24, 24)), jnp.int32)
    image = jnp.asarray(rng.uniform(-1, 1, (2, 24, 24, 3)), jnp.float32)
    from clade_jax.layers.labels import instance_edges

    x = jnp.concatenate(
        [jax.nn.one_hot(labels, 5), instance_edges(instance)[..., None], image], axis=-1
    )
    a, b = nnx.clone(d), nnx.clone(d)
    got, ref = a(labels, image, instance), b.forward_input(x)
    assert len(got) == len(ref) == 3
    for fg, fr in zip(got, ref, strict=True):
        for g, r in zip(fg, fr, strict=True):
            assert _rel(g, r) < 1e-5
    bad = labels.at[0, 5, 5].set(9)
    assert np.isnan(np.asarray(a(bad, image, instance)[0][-1][0])).any()


@pytest.mark.parametrize("h,w", [(24, 24), (13, 10), (7, 9)])
def test_pooled_onehot_equals_the_pooled_one_hot_bitwise(h, w):
    from clade_jax.models.discriminator import pooled_onehot
    from clade_jax.ops import avg_pool_3x3_s2

    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, (2, h, w))
    labels[1, 3, 2] = 7  # invalid: NaN in every window that holds it
    labels = jnp.asarray(labels, jnp.int32)
    onehot = jax.nn.one_hot(labels, 5)
    onehot = jnp.where(((labels < 0) | (labels >= 5))[..., None], jnp.nan, onehot)
    ref = np.asarray(avg_pool_3x3_s2(onehot))
    got = np.asarray(pooled_onehot(labels, 5))
    np.testing.assert_array_equal(got, ref)
    assert np.isnan(got[1]).any() and not np.isnan(got[0]).any()


@pytest.mark.parametrize("icpe", [False, True])
def test_clade_late_gathers_give_autodiffs_gradients(icpe):
    """CLADE's CPU backward (tables gathered anew once the output gradient exists) has the
    gradients of plain autodiff: for the input, both class tables and the ICPE convs."""
    from clade_jax.layers.clade import CLADE

    rng = np.random.default_rng(5)
    layer = CLADE(6, 4, "batch", icpe=icpe, rngs=nnx.Rngs(3))
    layer.class_affine.shift.set_value(jnp.asarray(rng.standard_normal((4, 6)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 5, 7)), jnp.int32)
    p = jnp.asarray(rng.uniform(-1, 1, (2, 5, 7, 2)), jnp.float32) if icpe else None
    g = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)

    def grads():
        def loss(m, x_):
            return jnp.sum(m(x_, labels, icpe=p) * g)

        return nnx.grad(loss, argnums=(0, 1))(nnx.clone(layer), x)

    forward = jax.make_jaxpr(lambda x_: nnx.clone(layer)(x_, labels, icpe=p))(x)
    assert "custom_vjp_call" in str(forward)  # the CPU formulation is the one tested
    dm_fast, dx_fast = grads()
    with conv_lib.plain_formulation():
        dm_plain, dx_plain = grads()
    assert _rel(dx_fast, dx_plain) < 1e-6
    fast, plain = nnx.to_flat_state(dm_fast), nnx.to_flat_state(dm_plain)
    assert len(fast) == len(plain) >= (6 if icpe else 2)
    for (path, a), (_, b) in zip(fast, plain, strict=True):
        assert float(jnp.max(jnp.abs(b[...]))) > 0, path  # every parameter gets a gradient
        assert _rel(a[...], b[...]) < 1e-6, path


def test_spade_backward_recomputes_the_shared_activation_with_autodiffs_gradients(monkeypatch):
    """On CPU SPADE keeps gamma, not the 128-channel shared activation, for the backward pass
    (it is recomputed from the labels), and its gradients are plain autodiff's; off CPU
    (`plain_formulation`, the GPU / TPU program) the activation is kept."""
    from clade_jax.layers import spade as spade_lib

    rng = np.random.default_rng(8)
    n, h, w, c, hidden = 2, 6, 5, 4, 24
    layer = spade_lib.SPADE(c, 5, "instance", hidden=hidden, rngs=nnx.Rngs(2))
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (n, h, w)), jnp.int32)
    g = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    graphdef, params = nnx.split(layer)

    def loss(params_, x_):
        return jnp.sum(nnx.merge(graphdef, params_)(x_, labels) * g)

    def activation_saved() -> bool:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(loss, params, x)  # a line per residual, "f32[2,6,5,24] ..."
        assert out.getvalue().count("\n") >= 3
        return f"[{n},{h},{w},{hidden}]" in out.getvalue()

    grads_remat = jax.grad(loss, argnums=(0, 1))(params, x)
    assert not activation_saved()
    monkeypatch.setattr(spade_lib, "_modulate_recomputing", spade_lib._modulate)
    assert activation_saved()  # without the remat it is kept: the check above can fail
    grads_plain = jax.grad(loss, argnums=(0, 1))(params, x)
    monkeypatch.undo()
    with conv_lib.plain_formulation():
        assert activation_saved()
    leaves_remat, leaves_plain = jax.tree.leaves(grads_remat), jax.tree.leaves(grads_plain)
    assert len(leaves_remat) == len(leaves_plain) >= 7  # x, 3 kernels, 3 biases
    for a, b in zip(leaves_remat, leaves_plain, strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0
        assert _rel(a, b) < 1e-6


def test_donated_kernels_are_updated_in_place_without_a_copy():
    """The CPU backward's weight gradient follows its input gradient (`after`), so XLA can
    update a donated kernel in place: no copy of any parameter is kept for the update (with
    the plain weight gradient it copied every kernel whose input gradient is needed)."""

    def loss(ws, x):
        for w in ws:
            x = jax.nn.relu(conv_lib.conv2d(x, w, padding=1, weight_grad="taps"))
        return jnp.sum(x**2)

    def step(ws, x):
        return [w - 0.1 * g for w, g in zip(ws, jax.grad(loss)(ws, x), strict=True)]

    ws = [jnp.full((3, 3, 16, 16), 0.01 * (i + 1), jnp.float32) for i in range(4)]
    x = jnp.ones((1, 8, 8, 16), jnp.float32)
    text = jax.jit(step, donate_argnums=0).lower(ws, x).compile().as_text()
    text = text[text.index("\nENTRY") :]
    params = re.findall(r"%(\S+) = f32\[3,3,16,16\]\S* parameter\(", text)
    assert len(params) == 4
    copied = [p for p in params if re.search(rf"copy\(%{re.escape(p)}\)", text)]
    assert copied == []
