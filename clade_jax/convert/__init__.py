"""Conversion of the official PyTorch SPADE / CLADE checkpoints (see `official.py`)."""

from clade_jax.convert.official import (
    build,
    from_official,
    load_official_state,
    official_name_map,
    read_opt_txt,
)

__all__ = ["build", "from_official", "load_official_state", "official_name_map", "read_opt_txt"]
