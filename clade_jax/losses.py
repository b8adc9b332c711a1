"""Losses of the SPADE / CLADE training, as pure functions returning float32 scalars.

The multiscale discriminator returns, per scale, the list of its feature maps; the GAN losses use
only the last map of each scale (the patch logits) and average over scales, as the official
`GANLoss` does; feature matching uses every map but the last.
"""

from __future__ import annotations

import jax.numpy as jnp

Features = list[list[jnp.ndarray]]


def _mean(x) -> jnp.ndarray:
    return jnp.mean(x.astype(jnp.float32))


def hinge_d_real(pred_real: Features) -> jnp.ndarray:
    """D loss on real inputs: mean over scales of -mean(min(pred - 1, 0))."""
    return sum(-_mean(jnp.minimum(p[-1] - 1, 0)) for p in pred_real) / len(pred_real)


def hinge_d_fake(pred_fake: Features) -> jnp.ndarray:
    """D loss on generated inputs: mean over scales of -mean(min(-pred - 1, 0))."""
    return sum(-_mean(jnp.minimum(-p[-1] - 1, 0)) for p in pred_fake) / len(pred_fake)


def hinge_g(pred_fake: Features) -> jnp.ndarray:
    """G adversarial loss: mean over scales of -mean(pred_fake)."""
    return sum(-_mean(p[-1]) for p in pred_fake) / len(pred_fake)


def feature_matching(pred_fake: Features, pred_real: Features) -> jnp.ndarray:
    """Unweighted feature matching: sum over scales and intermediate maps of L1, / num scales.

    Multiply by lambda_feat (10 in the papers). The caller stops gradients through pred_real.
    """
    total = 0.0
    for fake, real in zip(pred_fake, pred_real, strict=True):
        for f, r in zip(fake[:-1], real[:-1], strict=True):
            total = total + _mean(jnp.abs(f.astype(jnp.float32) - r.astype(jnp.float32)))
    return total / len(pred_fake)


def kld(mu: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over batch and dimensions (official KLDLoss).

    Multiply by lambda_kld (0.05 in the papers).
    """
    mu, logvar = mu.astype(jnp.float32), logvar.astype(jnp.float32)
    return -0.5 * jnp.sum(1 + logvar - jnp.square(mu) - jnp.exp(logvar))
