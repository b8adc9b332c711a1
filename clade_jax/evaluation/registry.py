"""The registry of segmenters by name: `get_segmenter("builtin", workdir=...)`.

It sits above the segmenters it names (the built-in one is trained by
`clade_jax.evaluation.segmenter`, which itself uses `segmentation`'s protocol and metrics), so
nothing below imports it. `register_segmenter(name)` adds a factory `(**kwargs) -> Segmenter`
(`segmentation.Segmenter`); `clade_jax.evaluation.evaluate` resolves `--segmenter=NAME` here.
"""

from __future__ import annotations

from collections.abc import Callable

from clade_jax.evaluation.segmentation import PAPER_SEGMENTERS, Segmenter

_REGISTRY: dict[str, Callable[..., Segmenter]] = {}


def register_segmenter(name: str) -> Callable:
    """Decorator: `@register_segmenter("upernet101")` on a factory `(**kwargs) -> Segmenter`."""

    def wrap(factory: Callable[..., Segmenter]) -> Callable[..., Segmenter]:
        if name in _REGISTRY:
            raise ValueError(f"segmenter {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_segmenters() -> list[str]:
    """Names accepted by `get_segmenter`."""
    return sorted(_REGISTRY)


def get_segmenter(name: str, **kwargs) -> Segmenter:
    """Builds a registered segmenter, e.g. `get_segmenter("builtin", workdir=...)`.

    Args:
      name: registry name.
      **kwargs: passed to the factory.

    Returns:
      A `Segmenter`.
    """
    if name not in _REGISTRY:
        paper = "; ".join(f"{d}: {s}" for d, s in PAPER_SEGMENTERS.items())
        raise KeyError(
            f"no segmenter named {name!r}; available: {available_segmenters()}. The papers' "
            f"segmenters ({paper}) are not ported yet: register a factory with "
            "`register_segmenter` (e.g. wrapping a converted network in `CallableSegmenter`)."
        )
    return _REGISTRY[name](**kwargs)


@register_segmenter("builtin")
def _builtin(workdir: str, **kwargs) -> Segmenter:
    """The segmenter trained by `clade_jax.evaluation.segmenter.train_segmenter` in `workdir`."""
    from clade_jax.evaluation.segmenter import load_segmenter  # training imports only when used

    return load_segmenter(workdir, **kwargs)
