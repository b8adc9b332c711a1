"""An official checkpoint folder -> a clade_jax workdir (config.json + orbax checkpoint).

    python -m clade_jax.convert --official_dir=checkpoints/ade20k_pretrained --workdir=/runs/ade

The official folder holds `opt.txt` and `<epoch>_net_G.pth` (sometimes `_D`, `_E`). The options
become our config (`config_from_options`), the networks are built from it, the weights are
mapped in (`official.load_official_state`, every mismatch reported), and the whole training state
is saved as step 0 of the workdir, so `evaluate.py`, `synthesize` and even `train.py` (fine-tuning)
treat it like one of our own runs. A missing `_D` / `_E` leaves that network at the official
initialisation (logged). `.pth` files are read without torch (`clade_jax.convert.torch_io`); an
`.npz` with the same names works as well.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from clade_jax import configs
from clade_jax.convert.official import (
    load_official_state,
    num_classes_from,
    param_free_norm_from,
    read_opt_txt,
)

DATASET_CONFIGS = {
    "ade20k": "ade20k",
    "coco": "coco_stuff",
    "cityscapes": "cityscapes",
    "custom": "custom",
}


def config_from_options(options: dict) -> ml_collections.ConfigDict:
    """Our config for the official options (dataset preset first, then every option that has a
    counterpart)."""
    mode = options.get("dataset_mode", "custom")
    base = DATASET_CONFIGS.get(mode, "custom")
    c = configs.load(base)
    d, m = c.data, c.model
    d.num_classes = num_classes_from(options)
    d.dontcare_label = int(options["label_nc"]) if options.get("contain_dontcare_label") else -1
    d.use_instance = not options.get("no_instance", False)
    d.icpe = bool(options.get("add_dist", False))
    d.crop_size = int(options.get("crop_size", d.crop_size))
    d.load_size = int(options.get("load_size", d.load_size))
    d.aspect_ratio = float(options.get("aspect_ratio", d.aspect_ratio))
    preprocess = options.get("preprocess_mode", d.preprocess)
    d.preprocess = "fixed" if preprocess.startswith("fixed") else "resize_and_crop"
    d.flip = not options.get("no_flip", False)
    if options.get("dataroot"):
        d.root = str(options["dataroot"])
    if options.get("netG", "spade") != "spade":
        raise ValueError(f"netG {options['netG']!r} has no clade_jax counterpart yet")
    m.generator = "spade"
    m.norm = options.get("norm_mode", "spade")
    norm_g = options.get("norm_G", "spectralspadesyncbatch3x3")
    m.param_free_norm = param_free_norm_from(norm_g)
    m.spectral_norm = "spectral" in norm_g
    m.ngf = int(options.get("ngf", m.ngf))
    m.num_upsampling_layers = options.get("num_upsampling_layers", m.num_upsampling_layers)
    m.use_vae = bool(options.get("use_vae", False))
    m.z_dim = int(options.get("z_dim", m.z_dim))
    m.ndf = int(options.get("ndf", m.ndf))
    m.n_layers_D = int(options.get("n_layers_D", m.n_layers_D))
    m.num_D = int(options.get("num_D", m.num_D))
    c.loss.lambda_feat = float(options.get("lambda_feat", c.loss.lambda_feat))
    c.loss.lambda_vgg = (
        0.0 if options.get("no_vgg_loss") else float(options.get("lambda_vgg", c.loss.lambda_vgg))
    )
    c.loss.lambda_kld = float(options.get("lambda_kld", c.loss.lambda_kld))
    lr = float(options.get("lr", 2e-4))
    if options.get("no_TTUR", False):
        c.optim.lr_g = c.optim.lr_d = lr
        c.optim.beta1, c.optim.beta2 = 0.5, 0.999
    else:
        c.optim.lr_g, c.optim.lr_d = lr / 2, lr * 2
        c.optim.beta1 = float(options.get("beta1", 0.0))
        c.optim.beta2 = float(options.get("beta2", 0.9))
    c.batch_size = int(options.get("batchSize", c.batch_size))
    c.num_epochs = int(options.get("niter", c.num_epochs))
    c.num_decay_epochs = int(options.get("niter_decay", c.num_decay_epochs))
    return c


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
    from clade_jax.training import checkpoint
    from clade_jax.training.state import GANState

    opt_path = os.path.join(official_dir, "opt.txt")
    if not os.path.exists(opt_path):
        raise FileNotFoundError(f"{opt_path} does not exist: need the official opt.txt")
    options = read_opt_txt(opt_path)
    config = config_from_options(options)
    g_path = _find(official_dir, epoch, "G")
    if g_path is None:
        raise FileNotFoundError(f"no {epoch}_net_G.pth (or .npz) in {official_dir}")
    model = GANState(config, 1, rngs=nnx.Rngs(config.seed))
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
