"""The training loop: an end-to-end tiny run, exact resume, multi-device equality, NaN checks."""

from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN_GROUP, initial_state
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from clade_jax.configs import synthetic
from clade_jax.data import make_train_iterator
from clade_jax.training import checkpoint, train_and_evaluate
from clade_jax.training.loop import abstract_batch, check_finite, make_mesh, shard_batch
from clade_jax.training.state import GANState, lr_factor
from clade_jax.training.step import (
    MODEL_INPUTS,
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
    # orbax's default layout, per-array metadata included (checkpoint.py swaps the array handler)
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    assert os.listdir(os.path.join(state_dir, "array_metadatas")) == ["process_0"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    samples = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert samples == ["step_0000002.png", "step_0000004.png"]
    saved = checkpoint.load_config(workdir)
    assert saved.model.norm == config.model.norm and saved.num_train_steps == 4
    # "auto" resolved before the model was built, and recorded (a CLADE model: off)
    assert config.model.spade_windows == "auto" and saved.model.spade_windows == "off"
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
    differences of ~lr on any change of summation order (one device or eight alike).

    Kept as it is, with the eager threefry init of `_sharded_step_outputs`: with the trainer's
    jit-compiled hash init and NumPy draws here (~25 s less compilation), the switchable check's
    reordering floor of G's 1024-channel kernels became 8.7e-4, 9e-5 of the gradient norm (a
    clean-clone CI run, 2026-12-02): not rounding-sized, so the floor check failed."""
    key = jax.random.key(42)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "kernel" and path[0] != "g_ema":
            key, sub = jax.random.split(key)
            fan_in = int(np.prod(var.shape[:-1]))
            var.set_value(jax.random.normal(sub, var.shape) / np.sqrt(fan_in))
    if getattr(model, "g_ema", None) is not None:  # the EMA starts as a copy of the generator
        nnx.update(model.g_ema, jax.tree.map(jnp.copy, nnx.state(model.gen.g)))


# Batch orders under which `rounding_floor` recomputes the gradients: the loss is a mean over
# the batch and BatchNorm's statistics are too, so each gives the same gradient in real arithmetic.
REORDERINGS = ((7, 6, 5, 4, 3, 2, 1, 0), (3, 4, 5, 6, 7, 0, 1, 2), (2, 0, 6, 1, 7, 5, 3, 4))

# How far a leaf's 1-vs-8-device gradient difference may exceed its rounding floor (its largest
# change under a reordered batch on one device). Measured on two CPUs (an AVX-512 Xeon, where
# both tests' largest ratio over their leaves was 1.9, and the AMD EPYC of CI, see README).
FLOOR_FACTOR = 10.0


def hinge_count_total(config, name: str) -> float:
    """The total magnitude of the terms that sum to this leaf's D-loss gradient where that sum
    cancels and reordering cannot show its rounding; 0 for every other leaf.

    Each scale's output bias (`discriminator_i/model{n_layers_D}/conv/bias`, one channel) gets
    d(D loss)/d(bias) = (#fake positions with pred > -1 - #real positions with pred < 1) /
    (num_D N), N the scale's output positions: two sums of one repeated term +-1 / (num_D N), at
    most 2N of them, 2 / num_D in all. A sum of equal terms rounds the same in any order (its
    rounding floor is exactly 0), but 8 partial sums and an all-reduce group it differently, with
    an error relative to the total (~1), not to the difference (0.02-0.04 here)."""
    m = config.model
    if re.search(rf"discriminator_\d+/model{m.n_layers_D}/conv/bias$", name):
        return 2.0 / m.num_D
    return 0.0


def allowed_difference(norm: float, floor: float, terms_total: float = 0.0) -> float:
    """The largest 1-vs-8 difference (2-norm) a gradient leaf of this `norm` may show: 1e-5 of
    its norm, or of its terms' total (`hinge_count_total`), or FLOOR_FACTOR times its rounding
    `floor` (which exceeds 1e-5 of the norm only for cancelling sums: conv biases before a
    BatchNorm, switchable norm's softmax mixing weights)."""
    return max(1e-5 * norm, 1e-5 * terms_total, FLOOR_FACTOR * floor)


def _sharded_step_outputs(config, devices, batch, reorderings=(), with_step=True):
    """On a mesh of `devices`, from the same reconditioned initial state: the G and D gradients
    and losses of the step's loss functions (`jax.grad` of `generator_losses` /
    `discriminator_losses`, inputs sharded as in training), the buffers after that G forward,
    and the state and metrics after one full `train_step`. With `reorderings` (permutations of
    the batch), also "floor": per G / D leaf, the largest norm of the gradient's change when the
    same program runs on the reordered batch (zero in real arithmetic: float32 rounding only).
    `with_step=False` skips the `train_step` (its compilation): no "state", "after", "metrics"."""
    mesh = make_mesh(devices)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    model = GANState(config, 16, rngs=nnx.Rngs(0))  # see `_recondition`
    _recondition(model)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, replicated)

    @jax.jit
    def grads(state, batch):
        m = nnx.merge(graphdef, state)
        fn = lambda gen, d: generator_losses(gen, d, batch, None, None, config.loss)
        (_, g_parts), g_grads = nnx.value_and_grad(
            fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True
        )(m.gen, m.d)
        # a snapshot: the D fake's forward below moves the same buffers again
        buffers = jax.tree.map(jnp.copy, nnx.state(m, nnx.BatchStat))
        fake, _ = generate(m.gen, batch, None)
        (_, d_parts), d_grads = nnx.value_and_grad(
            lambda d: discriminator_losses(d, batch, fake), has_aux=True
        )(m.d)
        return g_grads, d_grads, {**g_parts, **d_parts}, buffers

    g_grads, d_grads, parts, buffers = grads(state, shard_batch(batch, batch_sharding))
    floor = {"G": {}, "D": {}}
    for order in reorderings:
        reordered = {k: np.asarray(v)[list(order)] for k, v in batch.items()}
        g_r, d_r, _, _ = grads(state, shard_batch(reordered, batch_sharding))
        for net, a, b in (("G", g_grads, g_r), ("D", d_grads, d_r)):
            for (k, x), (_, y) in zip(_leaves(a).items(), _leaves(b).items(), strict=True):
                change = float(np.linalg.norm(np.asarray(x, np.float64) - y))
                floor[net][k] = max(floor[net].get(k, 0.0), change)
    out = {
        "G": _leaves(g_grads),
        "D": _leaves(d_grads),
        "parts": parts,
        "buffers": _leaves(buffers),
        "floor": floor,
    }
    if not with_step:
        return out
    before = _leaves(state)  # the step donates `state`
    shardings = jax.tree.map(lambda _: replicated, state)
    step = make_train_step(graphdef, config, shardings, batch_sharding)
    sharded = shard_batch(batch, batch_sharding)
    after, metrics = step(state, sharded, jnp.int32(0), jax.random.key(0), None)
    return {
        **out,
        "before": before,
        "state": (graphdef, after),
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


def one_config():
    """The tiny config with an EMA generator (decay 0.5: one step moves it visibly) and the
    two-scale discriminator (the tiny default has one): both scales' gradients are compared."""
    config = tiny("ema")
    config.ema_decay = 0.5
    config.model.num_D = 2
    return config


@pytest.fixture(scope="module")
def one_and_eight():
    """(config, outputs on 1 device, outputs on 8 devices) of `_sharded_step_outputs`."""
    config = one_config()
    batch = next(
        make_train_iterator(config.data, global_batch_size=8, process_index=0, process_count=1)
    )
    one = _sharded_step_outputs(config, jax.devices()[:1], batch, REORDERINGS)
    eight = _sharded_step_outputs(config, jax.devices()[:8], batch)
    return config, one, eight


@pytest.mark.slow(reason="the step compiled for 1 and 8 devices (~135 s cold set-up, shared)")
def test_one_device_and_eight_devices_agree(one_and_eight):
    _assert_one_and_eight_agree(*one_and_eight)


def _one_vs_eight_devices(config, with_step=True) -> None:
    """`_assert_one_and_eight_agree` for `config` (its own two runs; `with_step=False`: the
    gradients, losses and buffers only, without compiling the whole `train_step`)."""
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    batch = next(
        make_train_iterator(config.data, global_batch_size=8, process_index=0, process_count=1)
    )
    one = _sharded_step_outputs(config, jax.devices()[:1], batch, REORDERINGS, with_step)
    eight = _sharded_step_outputs(config, jax.devices()[:8], batch, with_step=with_step)
    _assert_one_and_eight_agree(config, one, eight)


def _assert_one_and_eight_agree(config, one, eight) -> None:
    """The same step on 8 devices and on 1 device (data parallel, global BatchNorm statistics).

    Compared, each to 1e-5 relative: the losses; the G and D gradients of the step's loss
    functions, leaf by leaf and as a whole (relative to their norms: gradients summed over the
    devices instead of averaged, or any other scale, fail here); BatchNorm / spectral buffers
    after the forward; and after one `train_step` every leaf of the state — G, D, both Adam
    states (whose first moment is the gradient itself with beta1 = 0), counters and buffers —
    except `cancelled_biases` (asserted to carry no gradient, see there). Gradients (and the
    Adam moments holding them) whose rounding exceeds 1e-5 of their norm, cancelling sums, are
    compared on their rounding floor instead (`allowed_difference`), itself asserted to be
    rounding: at most 1e-5 of the network's whole gradient.
    """
    assert config.optim.beta1 == 0.0  # then the Adam state's mu is (1 - beta1) * g = g
    for k in one["parts"]:
        assert _close(one["parts"][k], eight["parts"][k], 1e-5, max(abs(one["parts"][k]), 1e-3)), k
    assert ("metrics" in one) == ("metrics" in eight)
    for k in one.get("metrics", {}):
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
        floor = one["floor"][net]
        assert floor.keys() == g1.keys(), "run the 1-device outputs with REORDERINGS"
        # reordering changed the rounding (else the floor tests nothing) and only the rounding
        assert sum(f > 0 for f in floor.values()) > len(floor) / 2
        assert max(floor.values()) <= 1e-5 * total
        # The excluded leaves are what their reason says: no gradient beyond rounding noise.
        for k in set(g1) - live:
            assert np.linalg.norm(g1[k]) <= 1e-6 * total, (k, excluded[prefix + k])
        # Every other leaf carries a gradient (a layer whose gradient wrongly vanished fails)
        # and agrees leaf by leaf; absent classes' table rows are exactly zero on both.
        for k in live:
            assert np.linalg.norm(g1[k]) > 1e-6 * total, f"{net} {k}: no gradient"
            terms = hinge_count_total(config, k) if net == "D" else 0.0
            allowed = allowed_difference(np.linalg.norm(g1[k]), floor[k], terms)
            assert np.linalg.norm(g1[k].astype(np.float64) - g8[k]) <= allowed, f"{net} {k}"
        diff = np.sqrt(sum(np.sum(np.square(g1[k] - g8[k], dtype=np.float64)) for k in live))
        assert diff <= 1e-5 * total, net

    b1, b8 = one["buffers"], eight["buffers"]
    assert [k for k in b1 if "running" in k] and [k for k in b1 if k.endswith("/u")]
    for k in b1:
        # A batch mean is accurate relative to the data's spread, not to itself (it is near 0):
        # running means are compared on the scale of their layer's running standard deviation.
        scale = np.sqrt(b1[k.replace("running_mean", "running_var")]) if "mean" in k else b1[k]
        assert _close(b1[k], b8[k], 1e-5, np.linalg.norm(scale)), k

    if "after" in one:
        _assert_steps_agree(config, one, eight, excluded)


def _assert_steps_agree(config, one, eight, excluded) -> None:
    """The `train_step` part of `_assert_one_and_eight_agree`: every leaf of the state after it."""
    assert one["metrics"].keys() >= {"G_GAN", "D_Fake", "D_real", "G_total", "D_total"}
    s1, s8 = one["after"], eight["after"]
    assert s1.keys() == s8.keys()

    tails = ["/" + e[len("gen/g/") :] for e in excluded]  # all are generator leaves

    def is_excluded(k):  # the parameter, its Adam moments and its EMA copy
        return k.startswith(("gen/", "opt_g/", "g_ema/")) and any(k.endswith(t) for t in tails)

    compared = {k for k in s1 if not is_excluded(k)}
    copies = 3 + (config.ema_decay > 0)  # parameter, mu, nu (, EMA)
    assert len(s1) - len(compared) == copies * len(excluded)
    parts = ["gen/g/", "d/", "opt_g/opt_state/0/mu/", "opt_d/opt_state/0/mu/", "/nu/"]
    for part in parts + (["g_ema/"] if config.ema_decay > 0 else []):
        assert any(part in k for k in compared), part
    # The excluded biases move by +-lr_g (the sign of noise) differently on 1 and 8 devices; a
    # BatchNorm's batch mean includes them, so the running means of the D step's G forward (the
    # second forward of the step, momentum 0.1) differ by up to 0.1 * 2 lr_g per bias reaching
    # that norm (at most 4 in a row: fc, head_0, G_middle_0, G_middle_1 -> up_0).
    mean_atol = 0.1 * 2 * config.optim.lr_g * 4 if excluded else 0.0

    def moment_close(k, m1, m2) -> bool:
        """mu = g (beta1 = 0): within its gradient's `allowed_difference`; nu = (1 - beta2) g^2
        moves by (1 - beta2) (g1 + g8) dg: within 2 (1 - beta2) max|g| times that."""
        opt, name = k.split("/opt_state/0/")[0], k.split("/mu/" if "/mu/" in k else "/nu/")[1]
        net = "G" if opt == "opt_g" else "D"
        g = one[net][name]
        terms = hinge_count_total(config, name) if net == "D" else 0.0
        allowed = allowed_difference(np.linalg.norm(g), one["floor"][net][name], terms)
        if "/nu/" in k:
            allowed *= 2 * (1 - config.optim.beta2) * np.max(np.abs(g))
            allowed = max(allowed, 2e-5 * np.linalg.norm(m1))
        return bool(np.linalg.norm(np.asarray(m1, np.float64) - m2) <= allowed)

    def gradient_of(state, k):  # the step's gradient of a parameter (or of its EMA copy)
        for param, mu in (("gen/", "opt_g/"), ("g_ema/", "opt_g/"), ("d/", "opt_d/")):
            if k.startswith(param):
                name = ("g/" if param == "g_ema/" else "") + k[len(param) :]
                return state.get(f"{mu}opt_state/0/mu/{name}")
        return None

    def adam_first_step(g):  # beta1 = 0, bias-corrected: mu_hat = g, sqrt(nu_hat) = |g|
        g = np.asarray(g, np.float64)
        return g / (np.abs(g) + 1e-8)  # optax.adam's default eps

    for k in compared:
        g1, g8 = gradient_of(s1, k), gradient_of(s8, k)
        if g1 is not None:
            # Adam's first step moves an element by lr * g / (|g| + eps): ~lr * sign(g), except
            # where |g| is within a few orders of eps or below the two runs' (asserted tiny)
            # gradient difference, whose sign or size the difference can move. So the parameters
            # may differ exactly by what the gradients' difference implies; the rest is compared.
            lr = config.optim.lr_g if k.startswith(("gen/", "g_ema/")) else config.optim.lr_d
            scale = (1 - config.ema_decay) if k.startswith("g_ema/") else 1.0
            implied = -lr * scale * (adam_first_step(g1) - adam_first_step(g8))
            residual = np.asarray(s1[k], np.float64) - s8[k] - implied
            assert np.linalg.norm(residual) <= 1e-5 * np.linalg.norm(s1[k]), k
        elif s1[k].dtype.kind in "iub":
            assert np.array_equal(s1[k], s8[k]), k
        elif "running_mean" in k:
            std = np.sqrt(s1[k.replace("running_mean", "running_var")])
            assert np.all(np.abs(s1[k] - s8[k]) <= 1e-5 * std + mean_atol), k
        elif "/mu/" in k or "/nu/" in k:  # the Adam moments: as their gradient, see moment_close
            assert moment_close(k, s1[k], s8[k]), k
        else:
            assert _close(s1[k], s8[k], 1e-5), k
    # The G step's Adam state holds the loss function's gradient: the step differentiates the
    # same loss as the test (with beta1 = 0, mu = g; nu = (1 - beta2) g^2).
    for k, g in one["G"].items():
        if "gen/" + k not in excluded:
            assert moment_close(f"opt_g/opt_state/0/mu/{k}", g, s1[f"opt_g/opt_state/0/mu/{k}"]), k
            nu = (1 - config.optim.beta2) * np.square(g, dtype=np.float64)
            assert _close(nu, s1[f"opt_g/opt_state/0/nu/{k}"], 1e-4), k


def _params(leaves: dict, prefix: str) -> dict:
    """The float parameter leaves under `prefix` (no optimizer state, no buffers)."""
    skip = ("running_mean", "running_var", "/u", "/v")
    return {
        k[len(prefix) :]: v
        for k, v in leaves.items()
        if k.startswith(prefix) and not k.endswith(skip) and v.dtype.kind == "f"
    }


def test_one_step_moves_g_and_d_each_by_its_learning_rate(one_and_eight):
    """Adam's first step with beta1 = 0 is lr * g / (|g| + eps): every element of G moves by
    lr_g and every element of D by lr_d (against the gradient), wherever |g| >> eps."""
    config, one, _ = one_and_eight
    before, after = one["before"], one["after"]
    assert config.optim.lr_g != config.optim.lr_d  # TTUR
    for net, opt, lr in (
        ("gen/", "opt_g/opt_state/0/mu/", config.optim.lr_g),
        ("d/", "opt_d/opt_state/0/mu/", config.optim.lr_d),
    ):
        p0, p1, g = _params(before, net), _params(after, net), _params(after, opt)
        assert p0.keys() == p1.keys() == g.keys() and len(p0) > 10
        moved = total = 0
        for k in p0:
            live = np.abs(g[k]) > 1e-5  # the step's gradient (mu = g)
            step = p1[k][live].astype(np.float64) - p0[k][live]
            # float32 parameters of magnitude <= 2 resolve a step of 1e-4 to 2.4e-3 relative
            np.testing.assert_allclose(np.abs(step), lr, rtol=5e-3, err_msg=net + k)
            assert np.all(np.sign(step) == -np.sign(g[k][live])), net + k
            moved, total = moved + live.sum(), total + live.size
        assert moved > 0.5 * total, (net, moved, total)


def test_ema_generator_follows_the_step_and_is_what_evaluation_loads(one_and_eight, tmp_path):
    """After a step, g_ema = decay * g_before + (1 - decay) * g_after for parameters and the
    model's buffers for buffers; a checkpoint of that state loads the EMA generator for
    evaluation (`load_models`, used by evaluate and synthesize)."""
    config, one, _ = one_and_eight
    d = config.ema_decay
    before, after = one["before"], one["after"]
    g0, g1, ema = _params(before, "gen/g/"), _params(after, "gen/g/"), _params(after, "g_ema/")
    assert g0.keys() == ema.keys()
    for k in g0:
        np.testing.assert_allclose(ema[k], d * g0[k] + (1 - d) * g1[k], rtol=1e-6, atol=1e-9)
    assert sum(not np.array_equal(ema[k], g0[k]) for k in g0) > 0.9 * len(g0)  # it moved
    # Buffers are the generator's right after the G step's forward (the test's own forward of
    # the same loss); the D step's second forward moves only the generator's own.
    buffers = [k for k in after if k.startswith("g_ema/") and k.endswith(("running_var", "/u"))]
    assert buffers
    for k in buffers:
        g_step = one["buffers"]["gen/g/" + k[len("g_ema/") :]]
        np.testing.assert_allclose(after[k], g_step, rtol=1e-5, atol=1e-7, err_msg=k)
        assert not np.allclose(after[k], before[k], rtol=1e-4), k  # not the initial ones

    workdir = str(tmp_path / "run")
    checkpoint.write_config(config, workdir)
    manager = checkpoint.make_manager(workdir, with_data=False)
    checkpoint.save(manager, 1, one["state"][1], force=True)
    manager.wait_until_finished()
    manager.close()
    _, g, _, step = checkpoint.load_models(workdir)
    loaded = _params(_leaves(nnx.state(g)), "")
    assert step == 1 and loaded.keys() == ema.keys()
    for k in ema:
        np.testing.assert_array_equal(loaded[k], ema[k], err_msg=k)
    _, g, _, _ = checkpoint.load_models(workdir, use_ema=False)
    raw = _params(_leaves(nnx.state(g)), "")
    assert any(not np.array_equal(raw[k], ema[k]) for k in ema)


def test_one_training_step_with_vae_instance_maps_and_icpe():
    """One `train_step` of a model with all three inputs (one device, official init): finite
    losses including the KL term, and the kernels of the encoder, of the CLADE instance-edge
    convolutions and of the ICPE convolutions all move by lr_g (Adam's first step)."""
    config = tiny("vae,icpe")
    config.data.use_instance = True
    mesh = make_mesh(jax.devices()[:1])
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    make_iterator = lambda: make_train_iterator(
        config.data, global_batch_size=4, process_index=0, process_count=1
    )
    iterator = make_iterator()
    spec = abstract_batch(iterator, batch_sharding)  # the trainer compiles from these shapes
    batch = next(iterator)
    for k, v in next(make_iterator()).items():  # abstract_batch left the iterator where it was
        np.testing.assert_array_equal(batch[k], v)
    assert {"instance", "icpe"} <= set(batch) and set(spec) == set(batch) & set(MODEL_INPUTS)
    graphdef, state = initial_state(config)
    before = _leaves(state)
    step = make_train_step(
        graphdef, config, jax.tree.map(lambda _: replicated, state), batch_sharding
    )
    abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
    # compiled from shapes alone, as the trainer does; the real arguments must then fit it
    step.compile(jax.tree.map(abstract, state), spec, jnp.int32(0), jax.random.key(0), None)
    after, metrics = step(
        state, shard_batch(batch, batch_sharding), jnp.int32(0), jax.random.key(0), None
    )
    metrics = {k: float(v) for k, v in metrics.items()}
    assert {"KLD", "G_GAN", "D_real", "D_Fake"} <= metrics.keys(), metrics.keys()
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["KLD"] > 0
    after = _leaves(after)
    # (not icpe_shift: it scales the class shift table, which starts at zero, so its first
    # gradient is exactly zero)
    for part in ("gen/e/", "/inst_conv/", "/icpe_scale/"):
        # (biases may feed only BatchNorms, which cancel them: kernels act on varying inputs)
        names = [
            k
            for k in _params(before, "")
            if part in "/" + k and k.startswith("gen/") and k.endswith("kernel")
        ]
        assert names, part
        lr = config.optim.lr_g
        moved = [k for k in names if np.median(np.abs(after[k] - before[k])) > 0.5 * lr]
        assert len(moved) == len(names), (part, sorted(set(names) - set(moved)))
    # The discriminator sees the edge map: one-hot labels + edges + RGB input channels.
    first = before["d/discriminator_0/model0/conv/kernel"]
    assert first.shape[2] == config.data.num_classes + 1 + 3


def test_linear_decay_with_num_train_steps_at_its_boundaries():
    """num_train_steps = 10 over 1 + 1 "epochs": constant for steps 0..5, then 1 - k / 5 at
    step 5 + k; and the optimizer applies lr * factor(its update count)."""
    from clade_jax.training.state import make_optimizer

    config = tiny()
    config.num_train_steps = 10
    config.num_epochs, config.num_decay_epochs = 1, 1
    f = lr_factor(config, dataset_size=16)
    factors = [float(f(s)) for s in range(12)]
    np.testing.assert_allclose(factors, [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0], atol=1e-7)
    config.num_train_steps = 8
    config.num_epochs, config.num_decay_epochs = 3, 1  # decay over the last quarter: 2 steps
    f = lr_factor(config, dataset_size=16)
    np.testing.assert_allclose([float(f(s)) for s in (5, 6, 7, 8)], [1, 1, 0.5, 0], atol=1e-7)
    config.num_train_steps = 10
    config.num_decay_epochs = 0  # no decay at all
    assert float(lr_factor(config, 16)(9)) == 1.0
    config.num_epochs, config.num_decay_epochs = 1, 1
    opt = make_optimizer(1e-2, config, lr_factor(config, 16))
    params = {"w": jnp.ones(3)}
    opt_state = opt.init(params)
    sizes = []
    for _ in range(10):  # a constant gradient: Adam's step is lr * factor(count)
        updates, opt_state = opt.update({"w": jnp.full(3, 0.5)}, opt_state, params)
        sizes.append(float(jnp.abs(updates["w"][0])))
    np.testing.assert_allclose(sizes, 1e-2 * np.array(factors[:10]), rtol=1e-5, atol=1e-9)


def _poisoned_step(monkeypatch, bad_from: int, metric: str = "D_real"):
    """The loop's real step with `metric` replaced by NaN from step `bad_from` (0-based) on,
    as a diverging run would report it; the compiled step is the tiny run's (shared cache)."""
    from clade_jax.training import loop

    real = loop.make_train_step

    def make(*args, **kwargs):
        fn = real(*args, **kwargs)

        def step(state, batch, i, key, vgg):
            state, metrics = fn(state, batch, i, key, vgg)
            if int(i) >= bad_from:
                metrics = {**metrics, metric: jnp.float32(jnp.nan)}
            return state, metrics

        step.compile = fn.compile
        return step

    monkeypatch.setattr(loop, "make_train_step", make)


def _checkpoints(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def test_a_run_driven_to_nan_stops_naming_the_metric_without_checkpointing_it(
    monkeypatch, tmp_path
):
    config = tiny()
    config.log_every_steps = 2
    config.checkpoint_every_steps = 1
    _poisoned_step(monkeypatch, bad_from=1)  # step 2 (1-based) reports D_real = NaN
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"D_real became nan at step 2"):
        train_and_evaluate(config, workdir)
    # The step-1 save is asynchronous and may still be finishing when the error is raised.
    deadline = time.monotonic() + 60
    while any("tmp" in c for c in _checkpoints(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _checkpoints(workdir) == ["1"]  # step 1 was good; step 2 was not saved


def test_eval_every_steps_evaluates_each_fresh_checkpoint(monkeypatch, tmp_path):
    from clade_jax.evaluation import evaluate as evaluate_module

    config = tiny()
    config.num_train_steps = 3
    config.eval_every_steps = 2
    config.checkpoint_every_steps = config.log_every_steps = config.image_every_steps = 100
    workdir = str(tmp_path / "run")
    calls = []

    def fake_evaluate(wd, *, step, segmenter_workdir=None, **kwargs):
        calls.append((wd, step, _checkpoints(wd)))
        return {"fid": 1.0}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    train_and_evaluate(config, workdir)
    # every eval_every_steps and at the end, each on its checkpoint, written before evaluation
    assert [(wd, step) for wd, step, _ in calls] == [(workdir, 2), (workdir, 3)]
    assert "2" in calls[0][2] and "3" in calls[1][2]
    assert _checkpoints(workdir) == ["2", "3"]


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
