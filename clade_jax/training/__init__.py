"""Training: the GAN state, the pure training step, checkpoints and the loop."""

from clade_jax.training.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
