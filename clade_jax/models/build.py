"""The one place where a config becomes modules: explicit keyword arguments from `config`.

Everything downstream (training, evaluation, synthesis, the complexity table, and the conversion of
official checkpoints, which first turns the official options into a config) builds its networks
through these functions, so a config means the same network everywhere.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from clade_jax.models.discriminator import MultiscaleDiscriminator
from clade_jax.models.encoder import ConvEncoder
from clade_jax.models.generator import Generator

# No float16: it needs loss scaling, which the training step does not do (bfloat16 does not).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config):
    """The compute dtype named by `config.compute_dtype`."""
    if config.compute_dtype not in DTYPES:
        raise ValueError(
            f"compute_dtype must be one of {list(DTYPES)}, got {config.compute_dtype!r}"
        )
    return DTYPES[config.compute_dtype]


GENERATORS = ("spade_clade", "pix2pixhd", "unpool")
# Names of earlier versions (configs stored in old workdirs' config.json): "spade" built CLADE
# too (the norm is model.norm), "unpool_vaegan" has no VAE path.
DEPRECATED_GENERATORS = {"spade": "spade_clade", "unpool_vaegan": "unpool"}


def generator_name(config) -> str:
    """`config.model.generator`, with an old name mapped to the current one (and a warning)."""
    name = config.model.generator
    if name in DEPRECATED_GENERATORS:
        new = DEPRECATED_GENERATORS[name]
        warnings.warn(
            f"model.generator={name!r} is now {new!r}; the old name will go away",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    return name


def _spade_kwargs(config) -> dict:
    m, d = config.model, config.data
    return dict(
        num_classes=d.num_classes,
        norm=m.norm,
        param_free_norm=m.param_free_norm,
        ngf=m.ngf,
        crop_size=d.crop_size,
        aspect_ratio=d.aspect_ratio,
        num_upsampling_layers=m.num_upsampling_layers,
        use_instance=d.use_instance,
        icpe=d.icpe,
        spectral_norm=m.spectral_norm,
        spade_windows=spade_windows_enabled(config),
        norm_kwargs={"switchable_batch": m.switchable_batch}
        if m.param_free_norm == "switchable"
        else None,
    )


SPADE_WINDOWS = ("auto", "on", "off")


def spade_windows_enabled(config) -> bool:
    """`model.spade_windows` as SPADE's `windows`: "on" / "off"; "auto" is "off" until the trainer
    resolves it from the data (`resolve_spade_windows`); configs written before the field: off,
    and those of 2026-12-02/03 hold a bool."""
    value = config.model.get("spade_windows", "off")
    if isinstance(value, bool):
        return value
    if value not in SPADE_WINDOWS:
        raise ValueError(
            f"config.model.spade_windows must be one of {SPADE_WINDOWS}, got {value!r}"
        )
    return value == "on"


def has_spade_layers(config) -> bool:
    """Whether the generator that `config` builds has SPADE layers (pix2pixHD has none)."""
    return config.model.norm == "spade" and generator_name(config) != "pix2pixhd"


def resolve_spade_windows(config, interior: float) -> str | None:
    """Turn `model.spade_windows = "auto"` into "on" or "off" (in place) for training label maps
    whose interior fraction (`spade_windows.interior_fraction`) is `interior`: "on" where it is at
    least `spade_windows.AUTO_MIN_INTERIOR` and the generator has SPADE layers. Returns the
    choice, or None when the field was not "auto" (left as it is)."""
    from clade_jax.layers import spade_windows

    if config.model.get("spade_windows", "off") != "auto":
        spade_windows_enabled(config)  # validates
        return None
    choice = (
        "on" if has_spade_layers(config) and interior >= spade_windows.AUTO_MIN_INTERIOR else "off"
    )
    config.model.spade_windows = choice
    return choice


def generator_kwargs(config) -> dict:
    """Keyword arguments of the generator named by `config.model.generator`:

    * "spade_clade": the SPADE / CLADE generator of the papers (`Generator`; `model.norm` picks
      the normalization);
    * "pix2pixhd": the pix2pixHD global generator, the papers' baseline (`Pix2PixHDGenerator`);
    * "unpool": seed 003's feature-focused generator with max-unpooling (`UnpoolGenerator`).

    The old names "spade" and "unpool_vaegan" are accepted (`DEPRECATED_GENERATORS`).
    """
    m, d = config.model, config.data
    name = generator_name(config)
    if name == "spade_clade":
        return dict(**_spade_kwargs(config), use_vae=m.use_vae, z_dim=m.z_dim)
    if m.use_vae:
        raise ValueError(f"model.generator={name!r} has no VAE path (model.use_vae)")
    if name == "pix2pixhd":
        if d.icpe:
            raise ValueError("model.generator='pix2pixhd' has no ICPE (data.icpe)")
        return dict(
            num_classes=d.num_classes,
            ngf=m.ngf,
            use_instance=d.use_instance,
            spectral_norm=m.spectral_norm,
            crop_size=d.crop_size,
            aspect_ratio=d.aspect_ratio,
        )
    if name == "unpool":
        # .get: workdirs written before these knobs existed load with the defaults.
        num_unpool = m.get("unpool_num", -1)
        return dict(
            **_spade_kwargs(config),
            num_unpool=None if num_unpool < 0 else num_unpool,
            encoder_convs=tuple(m.get("unpool_encoder_convs", ())) or None,
            encoder_norm=m.get("unpool_encoder_norm", "instance"),
        )
    raise ValueError(f"unknown model.generator {m.generator!r}; available: {GENERATORS}")


def build_generator(config, *, rngs: nnx.Rngs) -> nnx.Module:
    from clade_jax.models.pix2pixhd import Pix2PixHDGenerator
    from clade_jax.models.unpool_vaegan import UnpoolGenerator

    kwargs = generator_kwargs(config)  # raises on an unknown name
    cls = {"spade_clade": Generator, "pix2pixhd": Pix2PixHDGenerator, "unpool": UnpoolGenerator}[
        generator_name(config)
    ]
    return cls(**kwargs, dtype=compute_dtype(config), rngs=rngs)


def build_discriminator(config, *, rngs: nnx.Rngs) -> MultiscaleDiscriminator:
    m, d = config.model, config.data
    return MultiscaleDiscriminator(
        d.num_classes,
        use_instance=d.use_instance,
        ndf=m.ndf,
        n_layers=m.n_layers_D,
        num_D=m.num_D,
        dtype=compute_dtype(config),
        rngs=rngs,
    )


def build_encoder(config, *, rngs: nnx.Rngs) -> ConvEncoder | None:
    """The VAE style encoder (width ngf, as officially), or None without `model.use_vae`."""
    if not config.model.use_vae:
        return None
    return ConvEncoder(
        config.model.ngf,
        config.data.crop_size,
        config.model.z_dim,
        dtype=compute_dtype(config),
        rngs=rngs,
    )


def count_params(module: nnx.Module) -> int:
    """Parameters as torch's `parameters()` counts them (no spectral-norm vectors, no running
    statistics)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
