"""Conversion of the official PyTorch SPADE / CLADE checkpoints: `official.py` (options -> a
config -> modules through `clade_jax.models.build`, the name map, loading), `workdir.py` (a
checkpoint folder -> a workdir), `torch_io.py` (`.pth` files read without torch)."""

from clade_jax.convert.official import (
    build,
    config_from_options,
    from_official,
    load_official_state,
    official_name_map,
    read_opt_txt,
)

__all__ = [
    "build",
    "config_from_options",
    "from_official",
    "load_official_state",
    "official_name_map",
    "read_opt_txt",
]
