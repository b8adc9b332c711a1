"""The training loop: an end-to-end tiny run, exact resume, multi-device equality, NaN checks."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN_GROUP
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from clade_jax.configs import synthetic
from clade_jax.data import make_train_iterator
from clade_jax.training import checkpoint, train_and_evaluate
from clade_jax.training.loop import check_finite, make_mesh, shard_batch
from clade_jax.training.state import GANState, lr_factor
from clade_jax.training.step import (
    discriminator_losses,
    generate,
    generator_losses,
    make_train_step,
)

# One xdist worker runs this module and test_evaluate.py: they share conftest's `tiny_run`.
pytestmark = pytest.mark.xdist_group(TINY_RUN_GROUP)


def tiny(arg: str = "") -> object:
    return synthetic.get_config("tiny" + ("," + arg if arg else ""))


def _leaves(state) -> dict:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def test_tiny_run_writes_checkpoints_events_and_images(tiny_run):
    config, workdir, _, _ = tiny_run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    samples = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert samples == ["step_0000002.png", "step_0000004.png"]
    saved = checkpoint.load_config(workdir)
    assert saved.model.norm == config.model.norm and saved.num_train_steps == 4
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(workdir, "samples", samples[-1])))
    # rows of [label | synthesized | real], num_image_samples rows, crop_size each
    assert grid.shape == (2 * 64, 3 * 64, 3)


def test_resume_equals_uninterrupted(tiny_run, tmp_path):
    """2 steps, stop (as if preempted), resume to 4: bitwise equal to 4 straight steps."""
    config, straight_dir, _, straight_state = tiny_run
    workdir = str(tmp_path / "resumed")
    train_and_evaluate(tiny(), workdir, stop_after=2)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]
    _, resumed_state = train_and_evaluate(tiny(), workdir)
    a, b = _leaves(straight_state), _leaves(resumed_state)
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, different[:5]
    # The same batches were consumed: both data iterators stand at the same position.
    path = lambda d: os.path.join(d, "checkpoints", "4", "data", "process_0-of-1.json")
    read = lambda d: json.load(open(path(d)))
    assert read(straight_dir) == read(workdir)


def _recondition(model) -> None:
    """Kernels ~ N(0, 1 / fan_in), as the parity fixtures do. The official init (xavier, gain
    0.02) gives activations of ~1e-3, where the BatchNorm epsilon dominates and float32 gradients
    carry relative rounding noise of ~1e-3, which Adam's sign-like first step turns into parameter
    differences of ~lr on any change of summation order (one device or eight alike)."""
    key = jax.random.key(42)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "kernel":
            key, sub = jax.random.split(key)
            fan_in = int(np.prod(var.shape[:-1]))
            var.set_value(jax.random.normal(sub, var.shape) / np.sqrt(fan_in))


def _sharded_step_outputs(config, devices, batch):
    """On a mesh of `devices`, from the same reconditioned initial state: the G and D gradients
    and losses of the step's loss functions (`jax.grad` of `generator_losses` /
    `discriminator_losses`, inputs sharded as in training), the buffers after that G forward,
    and the state and metrics after one full `train_step`."""
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    model = GANState(config, 16, rngs=nnx.Rngs(0))
    _recondition(model)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated)
    batch = shard_batch(batch, batch_sharding)

    @jax.jit
    def grads(state, batch):
        m = nnx.merge(graphdef, state)
        fn = lambda gen, d: generator_losses(gen, d, batch, None, None, config.loss)
        (_, g_parts), g_grads = nnx.value_and_grad(
            fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )(m.gen, m.d)
        buffers = nnx.state(m, nnx.BatchStat)
        fake, _ = generate(m.gen, batch, None)
        (_, d_parts), d_grads = nnx.value_and_grad(
            lambda d: discriminator_losses(d, batch, fake), has_aux=True
        )(m.d)
        return g_grads, d_grads, {**g_parts, **d_parts}, buffers

    g_grads, d_grads, parts, buffers = grads(state, batch)
    shardings = jax.tree.map(lambda _: replicated, state)
    step = make_train_step(graphdef, config, shardings, batch_sharding)
    after, metrics = step(state, batch, jnp.int32(0), jax.random.key(0), None)
    return {
        "G": _leaves(g_grads),
        "D": _leaves(d_grads),
        "parts": parts,
        "buffers": _leaves(buffers),
        "after": _leaves(after),
        "metrics": metrics,
    }


def cancelled_biases(config) -> dict[str, str]:
    """Parameters whose exact gradient is zero, by name, with the reason: their float gradient is
    rounding noise, which Adam's first step (lr * g / |g|) turns into updates of ~lr whatever the
    device count, so they cannot be compared across device counts."""
    if config.model.param_free_norm != "batch" or config.model.norm != "clade":
        return {}  # switchable / instance statistics do not cancel a per-channel constant
    # conv_0 feeds norm_1 only; a block's output reaches the next learned-shortcut block
    # (up_0 .. up_3: x feeds norm_0 and norm_s only) through identity shortcuts and nearest
    # upsampling, which carry a per-channel constant unchanged.
    out = {
        f"gen/g/{b}/conv_0/bias": "feeds only norm_1's BatchNorm (its batch mean cancels it)"
        for b in GENERATOR_BLOCKS
    }
    why = "reaches only the BatchNorms of {} (norm_0, norm_s) through identity shortcuts"
    for layer, block in (
        ("fc", "up_0"),
        ("head_0/conv_1", "up_0"),
        ("G_middle_0/conv_1", "up_0"),
        ("G_middle_1/conv_1", "up_0"),
        ("up_0/conv_1", "up_1"),
        ("up_1/conv_1", "up_2"),
        ("up_2/conv_1", "up_3"),
    ):
        out[f"gen/g/{layer}/bias"] = why.format(block)
    return out


GENERATOR_BLOCKS = ("head_0", "G_middle_0", "G_middle_1", "up_0", "up_1", "up_2", "up_3")


def _close(a, b, tol: float, scale=None) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.linalg.norm(a) if scale is None else scale
    return bool(np.linalg.norm(a - b) <= tol * scale)


def test_one_device_and_eight_devices_agree():
    _one_vs_eight_devices(tiny())


def _one_vs_eight_devices(config) -> None:
    """The same step on 8 devices and on 1 device (data parallel, global BatchNorm statistics).

    Compared, each to 1e-5 relative: the losses; the G and D gradients of the step's loss
    functions, leaf by leaf and as a whole (relative to their norms: gradients summed over the
    devices instead of averaged, or any other scale, fail here); BatchNorm / spectral buffers
    after the forward; and after one `train_step` every leaf of the state — G, D, both Adam
    states (whose first moment is the gradient itself with beta1 = 0), counters and buffers —
    except `cancelled_biases` (asserted to carry no gradient, see there).
    """
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    assert config.optim.beta1 == 0.0  # then the Adam state's mu is (1 - beta1) * g = g
    batch = next(
        make_train_iterator(config.data, global_batch_size=8, process_index=0, process_count=1)
    )
    one = _sharded_step_outputs(config, jax.devices()[:1], batch)
    eight = _sharded_step_outputs(config, jax.devices()[:8], batch)
    for k in one["parts"]:
        assert _close(one["parts"][k], eight["parts"][k], 1e-5, max(abs(one["parts"][k]), 1e-3)), k
    assert one["metrics"].keys() >= {"G_GAN", "D_Fake", "D_real", "G_total", "D_total"}
    for k in one["metrics"]:
        m1, m8 = one["metrics"][k], eight["metrics"][k]
        assert _close(m1, m8, 1e-5, max(abs(float(m1)), 1e-3)), k

    excluded = cancelled_biases(config)
    grad_names = {f"gen/{k}" for k in one["G"]} | {f"d/{k}" for k in one["D"]}
    assert set(excluded) <= grad_names
    for net in ("G", "D"):
        g1, g8 = one[net], eight[net]
        assert g1.keys() == g8.keys() and len(g1) > 10
        prefix = "gen/" if net == "G" else "d/"
        total = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in g1.values()))
        assert total > 0
        live = {k for k in g1 if prefix + k not in excluded}
        # The excluded leaves are what their reason says: no gradient beyond rounding noise.
        for k in set(g1) - live:
            assert np.linalg.norm(g1[k]) <= 1e-6 * total, (k, excluded[prefix + k])
        # Every other leaf carries a gradient (a layer whose gradient wrongly vanished fails)
        # and agrees leaf by leaf; absent classes' table rows are exactly zero on both.
        for k in live:
            assert np.linalg.norm(g1[k]) > 1e-6 * total, f"{net} {k}: no gradient"
            assert _close(g1[k], g8[k], 1e-5), f"{net} {k}"
        diff = np.sqrt(sum(np.sum(np.square(g1[k] - g8[k], dtype=np.float64)) for k in live))
        assert diff <= 1e-5 * total, net

    b1, b8 = one["buffers"], eight["buffers"]
    assert [k for k in b1 if "running" in k] and [k for k in b1 if k.endswith("/u")]
    for k in b1:
        # A batch mean is accurate relative to the data's spread, not to itself (it is near 0):
        # running means are compared on the scale of their layer's running standard deviation.
        scale = np.sqrt(b1[k.replace("running_mean", "running_var")]) if "mean" in k else b1[k]
        assert _close(b1[k], b8[k], 1e-5, np.linalg.norm(scale)), k

    s1, s8 = one["after"], eight["after"]
    assert s1.keys() == s8.keys()

    def is_excluded(k):  # the leaf itself or its Adam moments
        return any(k == e or k.endswith("/" + e.split("/", 1)[1]) for e in excluded)

    compared = {k for k in s1 if not is_excluded(k)}
    assert len(s1) - len(compared) == 3 * len(excluded)  # parameter, mu, nu
    for part in ("gen/g/", "d/", "opt_g/opt_state/0/mu/", "opt_d/opt_state/0/mu/", "/nu/"):
        assert any(part in k for k in compared), part
    # The excluded biases move by +-lr_g (the sign of noise) differently on 1 and 8 devices; a
    # BatchNorm's batch mean includes them, so the running means of the D step's G forward (the
    # second forward of the step, momentum 0.1) differ by up to 0.1 * 2 lr_g per bias reaching
    # that norm (at most 4 in a row: fc, head_0, G_middle_0, G_middle_1 -> up_0).
    mean_atol = 0.1 * 2 * config.optim.lr_g * 4 if excluded else 0.0
    for k in compared:
        if s1[k].dtype.kind in "iub":
            assert np.array_equal(s1[k], s8[k]), k
        elif "running_mean" in k:
            std = np.sqrt(s1[k.replace("running_mean", "running_var")])
            assert np.all(np.abs(s1[k] - s8[k]) <= 1e-5 * std + mean_atol), k
        else:  # nu = (1 - beta2) g^2: twice the gradient's relative error
            assert _close(s1[k], s8[k], 2e-5 if "/nu/" in k else 1e-5), k
    # The G step's Adam state holds the loss function's gradient: the step differentiates the
    # same loss as the test (with beta1 = 0, mu = g; nu = (1 - beta2) g^2).
    for k, g in one["G"].items():
        if "gen/" + k not in excluded:
            assert _close(g, s1[f"opt_g/opt_state/0/mu/{k}"], 1e-5), k
            nu = (1 - config.optim.beta2) * np.square(g, dtype=np.float64)
            assert _close(nu, s1[f"opt_g/opt_state/0/nu/{k}"], 1e-4), k


def test_nan_loss_names_the_metric_and_step():
    check_finite({"G_GAN": 1.0}, 3)
    with pytest.raises(FloatingPointError, match=r"D_real became nan at step 7.*num_classes"):
        check_finite({"G_GAN": 1.0, "D_real": float("nan")}, 7)


def test_learning_rate_schedule_is_the_official_one():
    config = tiny()
    config.num_train_steps = 0
    config.batch_size = 4
    config.num_epochs, config.num_decay_epochs = 2, 4
    f = lr_factor(config, dataset_size=8)  # 2 steps per epoch
    factors = [float(f(s)) for s in range(12)]
    # epochs 0-1 constant; decay epochs k = 0..3 at 1 - k/4 (the last epoch runs at 1/4)
    np.testing.assert_allclose(factors, [1, 1, 1, 1, 1, 1, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25])


def test_vgg_loss_without_weights_is_a_clear_error(tmp_path):
    config = tiny()
    config.loss.lambda_vgg = 10.0
    with pytest.raises(ValueError, match="vgg_weights.*torchvision"):
        train_and_evaluate(config, str(tmp_path))


def test_ema_update_averages_parameters_and_copies_buffers():
    from clade_jax.layers import Conv2d
    from clade_jax.training.state import update_ema

    model = Conv2d(2, 3, 3, spectral_norm=True, rngs=nnx.Rngs(0))
    ema = Conv2d(2, 3, 3, spectral_norm=True, rngs=nnx.Rngs(1))
    k_model, k_ema = np.asarray(model.kernel[...]), np.asarray(ema.kernel[...])
    update_ema(ema, model, 0.9)
    np.testing.assert_allclose(np.asarray(ema.kernel[...]), 0.9 * k_ema + 0.1 * k_model, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ema.u[...]), np.asarray(model.u[...]))
