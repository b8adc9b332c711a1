"""What a GAN training run holds: the networks, their optimizers, and the learning-rate schedule.

`GANState` is one NNX module with the generator (+ VAE encoder) as `gen`, the discriminator as
`d`, the two Adam optimizers (TTUR: separate learning rates), and an optional EMA copy of the
generator. `nnx.split(GANState)` gives the graph definition (static) and the state pytree that the
jit-compiled step takes, donates and returns, and that orbax checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from clade_jax.models.build import build_discriminator, build_encoder, build_generator


class GeneratorAndEncoder(nnx.Module):
    """What the generator optimizer updates: the generator and (with the VAE) the encoder."""

    def __init__(self, g: nnx.Module, e: nnx.Module | None):
        self.g = g
        self.e = e


def steps_per_epoch(config, dataset_size: int) -> int:
    """Whole global batches per epoch (the pipeline drops the remainder)."""
    return max(1, dataset_size // config.batch_size)


def total_steps(config, dataset_size: int) -> int:
    """`num_train_steps` if > 0, else (num_epochs + num_decay_epochs) epochs."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    epochs = config.num_epochs + config.num_decay_epochs
    if epochs <= 0:
        raise ValueError("set num_train_steps > 0 or num_epochs + num_decay_epochs > 0")
    return epochs * steps_per_epoch(config, dataset_size)


def lr_factor(config, dataset_size: int):
    """Step -> learning-rate factor in [0, 1], the official schedule.

    By epochs (the official `update_learning_rate`, applied at the end of every epoch): constant
    for `num_epochs` epochs, then in decay epoch k (k = 0, 1, ...) the factor 1 - k / n_decay, so
    the last epoch runs at 1 / n_decay. With `num_train_steps` > 0 the same shape is stretched
    over that many steps: the decay covers the fraction num_decay / (num + num_decay), per step.
    Built from optax's `join_schedules` of a constant and a `linear_schedule`.
    """
    n, n_decay = config.num_epochs, config.num_decay_epochs
    if n_decay <= 0 or (config.num_train_steps > 0 and n + n_decay <= 0):
        return lambda step: jnp.ones((), jnp.float32)
    if config.num_train_steps > 0:
        total = config.num_train_steps
        decay = max(1, round(total * n_decay / (n + n_decay)))
        unit, start = 1, total - decay  # per step
    else:
        decay, unit, start = n_decay, steps_per_epoch(config, dataset_size), n  # per epoch
    # Constant 1 until `start`, then 1 - k / decay (k = 0, 1, ...), 0 from k = decay on.
    schedule = optax.join_schedules(
        [optax.constant_schedule(1.0), optax.linear_schedule(1.0, 0.0, decay)], [start]
    )
    return lambda step: jnp.asarray(schedule(step // unit), jnp.float32)


def make_optimizer(lr: float, config, factor) -> optax.GradientTransformation:
    """Adam with the official betas (TTUR: 0, 0.9) and eps (1e-8), lr * factor(step)."""
    return optax.adam(
        lambda count: lr * factor(count), b1=config.optim.beta1, b2=config.optim.beta2, eps=1e-8
    )


class GANState(nnx.Module):
    """Generator (+ encoder), discriminator, their optimizers and the optional EMA generator."""

    def __init__(self, config, dataset_size: int, *, rngs: nnx.Rngs):
        factor = lr_factor(config, dataset_size)
        self.gen = GeneratorAndEncoder(
            build_generator(config, rngs=rngs), build_encoder(config, rngs=rngs)
        )
        self.d = build_discriminator(config, rngs=rngs)
        self.opt_g = nnx.Optimizer(
            self.gen, make_optimizer(config.optim.lr_g, config, factor), wrt=nnx.Param
        )
        self.opt_d = nnx.Optimizer(
            self.d, make_optimizer(config.optim.lr_d, config, factor), wrt=nnx.Param
        )
        self.g_ema = nnx.data(None)
        if config.ema_decay > 0:
            self.g_ema = nnx.clone(self.gen.g)
            # Own buffers: a donated state must not hold the same array twice.
            nnx.update(self.g_ema, jax.tree.map(jnp.copy, nnx.state(self.g_ema)))


def update_ema(ema: nnx.Module, model: nnx.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers (running statistics and
    spectral-norm vectors) are copied from the model."""
    ema_params, params = nnx.state(ema, nnx.Param), nnx.state(model, nnx.Param)
    nnx.update(ema, optax.incremental_update(params, ema_params, step_size=1.0 - decay))
    nnx.update(ema, nnx.state(model, nnx.BatchStat))
