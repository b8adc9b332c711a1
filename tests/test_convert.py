"""`python -m clade_jax.convert`: an official checkpoint folder becomes a workdir that the rest of
the project loads like one of its own runs, with the official outputs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import Fixture, nchw, rel_err
from flax import nnx

from clade_jax.convert.workdir import config_from_options, convert
from clade_jax.training.checkpoint import load_models


def write_official_dir(path, fx: Fixture, extra: dict | None = None) -> None:
    """An official checkpoint folder: opt.txt in the official format + latest_net_G.npz."""
    options = {**fx.options, **(extra or {})}
    lines = ["----------------- Options ---------------"]
    for k, v in sorted(options.items()):
        lines.append(f"{k:>25}: {v!s:<30}")
    lines.append("----------------- End -------------------")
    (path / "opt.txt").write_text("\n".join(lines) + "\n")
    np.savez(path / "latest_net_G.npz", **fx.state)


def test_converted_workdir_reproduces_the_official_output(tmp_path):
    fx = Fixture("clade_tiny")
    official = tmp_path / "official"
    official.mkdir()
    write_official_dir(official, fx)
    workdir = str(tmp_path / "run")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "clade_jax.convert",
            f"--official_dir={official}",
            f"--workdir={workdir}",
        ],
        check=True,
        capture_output=True,
    )
    config, g, e, step = load_models(workdir)
    assert step == 0 and e is None
    assert config.model.norm == "clade" and config.data.num_classes == 9
    assert config.data.dontcare_label == 8 and not config.data.use_instance
    labels = np.asarray(fx["input/label"], np.int32)
    image = nnx.jit(lambda m, x: m(x))(g, labels)
    assert rel_err(nchw(image), fx["output/image"]) <= 1e-5


def test_conversion_errors_list_the_mismatching_names(tmp_path):
    fx = Fixture("spade_tiny")
    write_official_dir(tmp_path, fx, extra={"ngf": 4})  # options say ngf 4, weights are ngf 2
    with pytest.raises(ValueError, match=r"(?s)head_0\.conv_0\.weight_orig.*does not fit"):
        convert(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="opt.txt"):
        convert(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def test_options_map_onto_our_config():
    c = config_from_options(
        {
            "dataset_mode": "cityscapes",
            "label_nc": 35,
            "no_instance": False,
            "crop_size": 512,
            "aspect_ratio": 2.0,
            "norm_mode": "clade",
            "num_upsampling_layers": "more",
            "lr": 0.0002,
            "batchSize": 16,
            "niter": 100,
            "niter_decay": 100,
            "add_dist": True,
        }
    )
    assert (c.data.num_classes, c.data.dontcare_label, c.data.use_instance) == (35, -1, True)
    assert c.data.icpe and c.model.norm == "clade" and c.model.num_upsampling_layers == "more"
    assert (c.optim.lr_g, c.optim.lr_d, c.optim.beta1, c.optim.beta2) == (1e-4, 4e-4, 0.0, 0.9)
    assert (c.num_epochs, c.num_decay_epochs, c.batch_size) == (100, 100, 16)
