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
from clade_jax.training.step import generator_losses, make_train_step

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
    """On a mesh of `devices`: the G-step gradients, losses and BatchNorm / spectral-norm
    buffers after that forward, and the state after one full `train_step`."""
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    model = GANState(config, 16, rngs=nnx.Rngs(0))
    _recondition(model)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated)
    batch = shard_batch(batch, batch_sharding)

    @jax.jit
    def g_grads(state, batch):
        m = nnx.merge(graphdef, state)
        fn = lambda gen, d: generator_losses(gen, d, batch, None, None, config.loss)
        (_, parts), grads = nnx.value_and_grad(
            fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )(m.gen, m.d)
        return grads, parts, nnx.state(m, nnx.BatchStat)

    grads, parts, buffers = g_grads(state, batch)
    shardings = jax.tree.map(lambda _: replicated, state)
    step = make_train_step(graphdef, config, shardings, batch_sharding)
    after, metrics = step(state, batch, jnp.int32(0), jax.random.key(0), None)
    return _leaves(grads), parts, _leaves(buffers), _leaves(after), metrics


def test_one_device_and_eight_devices_agree():
    _one_vs_eight_devices(tiny())


def _one_vs_eight_devices(config) -> None:
    """The same step on 8 devices and on 1 device (data parallel, global BatchNorm statistics).

    Losses and the BatchNorm / spectral-norm buffers of the step's forward agree to 1e-5. After
    the Adam update, every parameter with a live gradient agrees to 1e-5 relative; parameters
    whose exact gradient is zero (conv biases followed by BatchNorm, which cancels them) get
    gradients of pure rounding noise that Adam's first step scales up to ~lr (its update is
    lr * g / |g|), whatever the device count, so they are excluded from that last comparison
    (identified from the gradients themselves).
    """
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    batch = next(
        make_train_iterator(config.data, global_batch_size=8, process_index=0, process_count=1)
    )
    g1, p1, b1, s1, m1 = _sharded_step_outputs(config, jax.devices()[:1], batch)
    g8, p8, b8, s8, m8 = _sharded_step_outputs(config, jax.devices()[:8], batch)
    for k in p1:
        assert abs(float(p1[k]) - float(p8[k])) <= 1e-5 * max(abs(float(p1[k])), 1e-3), k
    for k in m1:
        assert abs(float(m1[k]) - float(m8[k])) <= 1e-5 * max(abs(float(m1[k])), 1e-3), k
    total = np.sqrt(sum(np.sum(np.square(g)) for g in g1.values()))
    stats = [k for k in b1 if "running" in k]
    assert stats
    for k in b1:
        # A batch mean is accurate relative to the data's spread, not to itself (it is near 0):
        # running means are compared on the scale of their layer's running standard deviation.
        scale = np.sqrt(b1[k.replace("running_mean", "running_var")]) if "mean" in k else b1[k]
        assert np.linalg.norm(b1[k] - b8[k]) <= 1e-5 * np.linalg.norm(scale), k
    live = {k for k, g in g1.items() if np.linalg.norm(g) > 1e-6 * total}
    compared = 0
    for k in s1:
        name = k.replace("gen/", "", 1) if k.startswith("gen/") else None
        if name is None or name not in live:
            continue
        compared += 1
        assert np.linalg.norm(s1[k] - s8[k]) <= 1e-5 * np.linalg.norm(s1[k]), k
    assert compared > 20


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
