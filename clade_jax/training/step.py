"""The training step: one generator (+ encoder) update, then one discriminator update.

This is the official `Pix2PixTrainer.run_generator_one_step` / `run_discriminator_one_step` pair as
one pure function `train_step(state, batch, step, consts) -> (state, metrics)`:

1. G step: fake = G(labels[, z from E(real)]); D sees [fake; real] (one batch, as the official
   `discriminate`); loss = hinge_G + lambda_feat * feature matching + lambda_vgg * VGG +
   lambda_kld * KL; Adam update of G (+ E).
2. D step: the fake is generated again by the updated G (no gradient), D sees [fake; real];
   loss = hinge_D(fake) + hinge_D(real); Adam update of D.

Both networks stay in training mode throughout, as officially: every forward uses batch
statistics and updates the running statistics, and every spectral-norm layer runs one power
iteration per forward (so G's buffers move twice per step and D's twice as well).

Randomness (the VAE's reparameterization noise) comes from `fold_in(key, step)`. Metrics are a
flat dict of float32 scalars.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax import losses
from clade_jax.models.encoder import reparameterize
from clade_jax.models.vgg import vgg_loss
from clade_jax.training.state import GANState, update_ema

MODEL_INPUTS = ("label", "image", "instance", "icpe")


def generate(gen, batch: dict, key: jax.Array | None):
    """Run the generator on a batch; with the VAE, z comes from encoding the real image.

    Returns (fake image (N, H, W, 3) float32, (mu, logvar) or None).
    """
    z, stats = None, None
    if gen.e is not None:
        mu, logvar = gen.e(batch["image"])
        z = reparameterize(mu, logvar, key)
        stats = (mu, logvar)
    fake = gen.g(batch["label"], z=z, instance=batch.get("instance"), icpe=batch.get("icpe"))
    return fake, stats


def discriminate(d, batch: dict, fake: jnp.ndarray):
    """D on [fake; real] in one batch; returns (pred_fake, pred_real) feature lists."""
    n = fake.shape[0]
    labels = jnp.concatenate([batch["label"], batch["label"]])
    instance = batch.get("instance")
    if instance is not None:
        instance = jnp.concatenate([instance, instance])
    preds = d(labels, jnp.concatenate([fake, batch["image"].astype(fake.dtype)]), instance)
    pred_fake = [[f[:n] for f in scale] for scale in preds]
    pred_real = [[f[n:] for f in scale] for scale in preds]
    return pred_fake, pred_real


def generator_losses(gen, d, batch, key, vgg_params, loss_cfg):
    """Total generator loss and its named parts (the official `compute_generator_loss`)."""
    fake, stats = generate(gen, batch, key)
    pred_fake, pred_real = discriminate(d, batch, fake)
    pred_real = jax.lax.stop_gradient(pred_real)
    parts = {"G_GAN": losses.hinge_g(pred_fake)}
    if loss_cfg.lambda_feat > 0:
        parts["G_GAN_Feat"] = loss_cfg.lambda_feat * losses.feature_matching(pred_fake, pred_real)
    if loss_cfg.lambda_vgg > 0:
        parts["G_VGG"] = loss_cfg.lambda_vgg * vgg_loss(vgg_params, fake, batch["image"])
    if stats is not None:
        parts["KLD"] = loss_cfg.lambda_kld * losses.kld(*stats)
    return sum(parts.values()), parts


def discriminator_losses(d, batch, fake):
    pred_fake, pred_real = discriminate(d, batch, jax.lax.stop_gradient(fake))
    parts = {"D_Fake": losses.hinge_d_fake(pred_fake), "D_real": losses.hinge_d_real(pred_real)}
    return sum(parts.values()), parts


def train_step(
    graphdef,
    state,
    batch: dict,
    step: jnp.ndarray,
    key: jax.Array,
    vgg_params,
    *,
    loss_cfg,
    ema_decay: float,
):
    """One G update and one D update (see the module docstring). Pure; jit it with the state
    donated (`make_train_step`)."""
    model: GANState = nnx.merge(graphdef, state)
    key = jax.random.fold_in(key, step)
    key_g, key_d = jax.random.split(key)

    def g_loss_fn(gen, d):
        return generator_losses(gen, d, batch, key_g, vgg_params, loss_cfg)

    grad_fn = nnx.value_and_grad(g_loss_fn, argnums=nnx.DiffState(0, nnx.Param), has_aux=True)
    (g_total, g_parts), g_grads = grad_fn(model.gen, model.d)
    model.opt_g.update(model.gen, g_grads)
    if model.g_ema is not None:
        update_ema(model.g_ema, model.gen.g, ema_decay)

    fake, _ = generate(model.gen, batch, key_d)

    def d_loss_fn(d):
        return discriminator_losses(d, batch, fake)

    (d_total, d_parts), d_grads = nnx.value_and_grad(d_loss_fn, has_aux=True)(model.d)
    model.opt_d.update(model.d, d_grads)

    metrics = {**g_parts, **d_parts, "G_total": g_total, "D_total": d_total}
    metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    return nnx.state(model), metrics


def make_train_step(graphdef, config, state_sharding, batch_sharding):
    """jit-compiled `train_step` with the state donated and the given shardings."""
    fn = functools.partial(
        train_step, graphdef, loss_cfg=config.loss, ema_decay=float(config.ema_decay)
    )
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding, None, None, None),
        out_shardings=(state_sharding, None),
        donate_argnums=(0,),
    )


def sample_train_mode(graphdef, state, batch: dict, key: jax.Array):
    """What the G step would generate for `batch` (training mode), without changing the state."""
    model: GANState = nnx.merge(graphdef, state)
    fake, _ = generate(model.gen, batch, key)
    return fake
