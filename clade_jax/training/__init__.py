"""Training: the GAN state, the pure training step, checkpoints and the loop.

`train_and_evaluate` (the loop) is imported on first use, so `clade_jax.training.state` or
`.checkpoint` do not pull in the loop and everything it uses (writers, evaluation).
"""

__all__ = ["train_and_evaluate"]


def __getattr__(name):
    if name == "train_and_evaluate":
        from clade_jax.training.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
