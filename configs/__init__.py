"""clade_jax configs: `get_config(arg)` files for ml_collections' config_flags (see common.py)."""
