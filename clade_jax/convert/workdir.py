"""An official checkpoint folder -> a clade_jax workdir (config.json + orbax checkpoint).

    python -m clade_jax.convert --official_dir=checkpoints/ade20k_pretrained --workdir=/runs/ade

The official folder holds `opt.txt` and `<epoch>_net_G.pth` (sometimes `_D`, `_E`). The options
become our config (`official.config_from_options`), the networks are built from it, the weights are
mapped in (`official.load_official_state`, every mismatch reported), and the whole training state
is saved as step 0 of the workdir, so `evaluate.py`, `synthesize` and even `train.py` (fine-tuning)
treat it like one of our own runs. A missing `_D` / `_E` leaves that network at the official
initialisation (logged). `.pth` files are read without torch (`clade_jax.convert.torch_io`); an
`.npz` with the same names works as well.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from clade_jax.convert.official import config_from_options, load_official_state, read_opt_txt


def _find(official_dir: str, epoch: str, net: str) -> str | None:
    for ext in (".pth", ".npz"):
        path = os.path.join(official_dir, f"{epoch}_net_{net}{ext}")
        if os.path.exists(path):
            return path
    return None


def read_state(path: str) -> dict[str, np.ndarray]:
    """An official state dict from a `.pth` (read without torch) or an `.npz` of the same names."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    from clade_jax.convert.torch_io import load_torch_file

    return load_torch_file(path)


def convert(official_dir: str, workdir: str, *, epoch: str = "latest") -> str:
    """Write `workdir` from the official checkpoint folder; returns the workdir.

    Raises:
      FileNotFoundError: no opt.txt or no generator file.
      ValueError: the weights do not match the options (every unknown, missing or misshaped name
        is listed).
    """
    from clade_jax.training import checkpoint, runtime
    from clade_jax.training.state import GANState

    opt_path = os.path.join(official_dir, "opt.txt")
    if not os.path.exists(opt_path):
        raise FileNotFoundError(f"{opt_path} does not exist: need the official opt.txt")
    options = read_opt_txt(opt_path)
    config = config_from_options(options, source=opt_path)
    g_path = _find(official_dir, epoch, "G")
    if g_path is None:
        raise FileNotFoundError(f"no {epoch}_net_G.pth (or .npz) in {official_dir}")
    # Initialised in one compiled program, as the training loop does (eagerly, every parameter
    # shape would compile its own initialiser: minutes on a small CPU).
    make = lambda key: GANState(config, 1, rngs=nnx.Rngs(key))
    key = runtime.init_key(config.seed)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(key)))
    model = nnx.merge(graphdef, jax.jit(lambda k: nnx.state(make(k)))(key))
    load_official_state(model.gen.g, read_state(g_path), source=g_path)
    for net, module in (("D", model.d), ("E", model.gen.e)):
        path = _find(official_dir, epoch, net)
        if module is None:
            continue
        if path is None:
            logging.warning(
                "no %s_net_%s in %s: that network keeps the official initialisation",
                epoch,
                net,
                official_dir,
            )
            continue
        load_official_state(module, read_state(path), source=path)
    if model.g_ema is not None:
        nnx.update(model.g_ema, nnx.state(model.gen.g))
    checkpoint.write_config(config, workdir)
    manager = checkpoint.make_manager(workdir, keep=config.keep_checkpoints)
    checkpoint.save(manager, 0, nnx.state(model), force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir
