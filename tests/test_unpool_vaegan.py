"""Seed 003's encoder-guided unpooling generator: pooling with indices, unpooling, the generator.

Max pooling with indices and max-unpooling are checked against a NumPy reference written from
PyTorch's `max_pool2d(return_indices=True)` / `max_unpool2d` definitions; the generator's
parameter count against a closed form; tiny forwards with SPADE, CLADE and switchable norms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clade_jax.models.unpool_vaegan as uv
from clade_jax.models.build import count_params
from clade_jax.models.unpool_vaegan import (
    UnpoolGenerator,
    max_pool_with_indices,
    max_unpool,
    torch_indices,
)


def _numpy_pool(x):
    """PyTorch's 2x2/2 max pool with flat indices (row * W + col per plane), first max on ties."""
    n, h, w, c = x.shape
    out = np.zeros((n, h // 2, w // 2, c), x.dtype)
    idx = np.zeros((n, h // 2, w // 2, c), np.int64)
    for i in range(h // 2):
        for j in range(w // 2):
            best = np.full((n, c), -np.inf)
            for a in range(2):
                for b in range(2):
                    v = x[:, 2 * i + a, 2 * j + b]
                    take = v > best  # strict: the first maximum wins
                    best = np.where(take, v, best)
                    idx[:, i, j] = np.where(take, (2 * i + a) * w + 2 * j + b, idx[:, i, j])
            out[:, i, j] = best
    return out, idx


def _numpy_unpool(x, flat_idx, h, w):
    """PyTorch's max_unpool2d: out.view(N, C, H*W)[..., idx] = x."""
    n, _, _, c = x.shape
    out = np.zeros((n, h * w, c), x.dtype)
    for b in range(n):
        for ch in range(c):
            out[b, flat_idx[b, ..., ch].ravel(), ch] = x[b, ..., ch].ravel()
    return out.reshape(n, h, w, c)


def test_pool_and_unpool_match_the_pytorch_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 8, 3)).astype(np.float32)
    x[0, :2, :2, 0] = 1.5  # a tie: the first (top-left) position wins
    pooled, idx = jax.jit(max_pool_with_indices)(jnp.asarray(x))
    ref, ref_idx = _numpy_pool(x)
    np.testing.assert_array_equal(pooled, ref)
    np.testing.assert_array_equal(torch_indices(idx), ref_idx)
    assert int(idx[0, 0, 0, 0]) == 0
    y = rng.normal(size=pooled.shape).astype(np.float32)
    np.testing.assert_array_equal(
        jax.jit(max_unpool)(jnp.asarray(y), idx), _numpy_unpool(y, ref_idx, 6, 8)
    )


def test_unpool_of_pool_keeps_the_maxima_in_place_and_zeros_elsewhere():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 4, 5)), jnp.float32)
    pooled, idx = max_pool_with_indices(x)
    y = np.asarray(max_unpool(pooled, idx))
    window_max = np.repeat(np.repeat(np.asarray(pooled), 2, 1), 2, 2)
    is_max = np.asarray(x) == window_max
    np.testing.assert_array_equal(y[is_max], np.asarray(x)[is_max])
    assert np.all(y[~is_max] == 0)
    assert is_max.reshape(1, 4, 2, 2, 2, 5).sum(axis=(2, 4)).min() == 1  # one per window


def test_pool_gradient_goes_to_the_maxima_only():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 2)), jnp.float32)
    g = jax.grad(lambda x: max_pool_with_indices(x)[0].sum())(x)
    _, idx = max_pool_with_indices(x)
    np.testing.assert_array_equal(g, max_unpool(jnp.ones(idx.shape), idx))


def materialize(factory, seed: int = 0):
    """The module `factory()` builds, with NumPy-drawn weights instead of its initialisers.

    Running the real initialisers eagerly compiles one small program per parameter shape (over a
    minute on two busy cores for these tiny generators); these tests need only finite weights.
    Running statistics start as after the real init (switchable: 0, batch: mean 0 / var 1).
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))
        if name in ("running_mean", "running_var", "mean_weight", "var_weight"):
            return np.zeros(spec.shape, spec.dtype)
        x = rng.standard_normal(spec.shape).astype(spec.dtype)
        if name in ("u", "v"):
            return x / np.linalg.norm(x)
        return 0.1 * x

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def compiled(fn, model):
    """`fn(model, *args)` compiled once for `model`'s structure, returning (outputs, new state).

    XLA's backend optimisation is off: these tiny forwards run in milliseconds, but optimising
    their few thousand HLO ops takes twice as long as compiling them plainly on two busy cores.
    """
    graphdef = nnx.graphdef(model)

    def pure(state, *args):
        m = nnx.merge(graphdef, state)
        return fn(m, *args), nnx.state(m)

    jitted = jax.jit(pure, compiler_options={"xla_backend_optimization_level": 0})
    return lambda model, *args: jitted(nnx.state(model), *args)


def _tiny(**kwargs):
    args = dict(ngf=2, crop_size=32, encoder_convs=(1, 1, 1, 1, 1)) | kwargs
    return materialize(lambda: UnpoolGenerator(5, **args, rngs=nnx.Rngs(0)))


def _labels(shape=(2, 32, 32), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 5, shape), jnp.int32)


def test_spade_forward_unpools_with_the_encoder_masks(monkeypatch):
    """All upsamplings but the last are unpoolings guided by the matching encoder masks."""
    model = _tiny(norm="spade")
    calls = []
    real = uv.max_unpool

    def spy(x, idx):
        calls.append((x.shape, idx))
        return real(x, idx)

    monkeypatch.setattr(uv, "max_unpool", spy)

    def body(model, labels):
        calls.clear()
        y = model(labels)
        _, masks = model.encoder(jax.nn.one_hot(labels, 5))
        return y, [idx for _, idx in calls], masks

    forward = compiled(body, model)
    labels = _labels()
    (y, used, masks), _ = forward(model, labels)
    assert y.shape == (2, 32, 32, 3) and np.all(np.isfinite(y)) and np.all(np.abs(y) <= 1)
    # Latent grid 1x1; unpoolings 1->2->4->8->16 with widths 16nf, 16nf, 8nf, 4nf; then nearest.
    assert [s for s, _ in calls] == [(2, 1, 1, 32), (2, 2, 2, 32), (2, 4, 4, 16), (2, 8, 8, 8)]
    assert [m.shape[1] for m in masks] == [16, 8, 4, 2, 1]
    for idx, mask in zip(used, masks[::-1][:4], strict=True):
        np.testing.assert_array_equal(idx, mask)
    bad = labels.at[1, 3, 3].set(7)  # out-of-range labels poison the output, never clamp
    assert np.isnan(np.asarray(forward(model, bad)[0][0])).any()


def test_parameter_count_is_spade_without_fc_plus_a_vgg19_encoder():
    model = nnx.eval_shape(lambda: UnpoolGenerator(151, norm="spade", rngs=nnx.Rngs(0)))
    nf = 64
    widths = [2 * nf, 4 * nf, 8 * nf, 16 * nf, 16 * nf]
    enc, c_in = 0, 151
    for width, n in zip(widths, (2, 2, 4, 4, 4), strict=True):
        for _ in range(n):
            enc += 9 * c_in * width  # spectral norm + instance norm: no bias
            c_in = width
    fc = 151 * 16 * nf * 9 + 16 * nf
    assert count_params(model.encoder) == enc == 80_242_560
    assert count_params(model) == 96_492_483 - fc + enc  # official SPADE ADE20k generator


def test_clade_with_switchable_norm_instance_and_icpe_train_and_eval():
    model = _tiny(
        norm="clade",
        param_free_norm="switchable",
        encoder_norm="switchable",
        use_instance=True,
        icpe=True,
        norm_kwargs={"switchable_batch": True},
        spectral_norm=False,  # fewer ops to compile; spectral norm is covered above
    )
    labels, instance = _labels(), _labels(seed=1)
    icpe = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 2)), jnp.float32)

    forward = lambda m: m(labels, instance=instance, icpe=icpe)
    y_train, state = compiled(forward, model)(model)  # batch statistics
    nnx.update(model, state)  # the running statistics it updated
    assert y_train.shape == (2, 32, 32, 3) and np.all(np.isfinite(y_train))
    assert np.any(model.up_1.norm_0.param_free_norm.running_mean[...] != 0)
    assert np.any(model.encoder.conv3_1.norm.running_var[...] != 0)
    model.eval()
    y_eval, _ = compiled(forward, model)(model)  # running statistics
    assert np.all(np.isfinite(y_eval)) and not np.allclose(y_eval, y_train)
    with pytest.raises(ValueError, match="icpe"):
        model(labels, instance=instance)


def test_config_knobs_reach_the_generator():
    """`model.unpool_*` in the config select the unpooling depth and the encoder's layout."""
    from clade_jax.configs import ade20k
    from clade_jax.models.build import build_generator

    c = ade20k.get_config("generator=unpool")
    c.model.unpool_num = 2
    c.model.unpool_encoder_convs = (1, 1, 1, 2, 1)
    c.model.unpool_encoder_norm = "none"
    g = nnx.eval_shape(lambda: build_generator(c, rngs=nnx.Rngs(0)))
    assert g.num_unpool == 2
    names = {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(g.encoder))}
    assert names == {"conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv4_2", "conv5_1"}
    assert g.encoder.conv1_1.conv.bias is not None  # no norm: the convs keep their biases
    default = nnx.eval_shape(
        lambda: build_generator(ade20k.get_config("generator=unpool"), rngs=nnx.Rngs(0))
    )
    assert default.num_unpool == 4 and default.encoder.convs == (2, 2, 4, 4, 4)
