"""The papers' other systems as first-class configurations: the pix2pixHD baseline, seed 003's
unpool VAE-GAN generator, and switchable normalization (with and without batch statistics) —
each trains, resumes exactly, and evaluates end to end.

These runs use one device: data parallelism is tested once for all models in test_training.py
(and for switchable norm's batch statistics below), and 8 host devices on 2 cores make every step
2.4x slower. Switchable norm with batch statistics resumes and evaluates inside seed 003's system
(`unpool_vaegan`: every SPADE layer and encoder convolution of it is switchable, so its mixture
weights and running statistics are checkpointed and restored there); a separate CLADE-generator
run of the same norm repeated that at ~100 s of the suite's 20-minute budget. The runs write no
sample grids (image_every_steps = 0): none is asserted here, and they are tested in
test_training.py.
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
from test_training import _leaves, _one_vs_eight_devices

from clade_jax.configs import synthetic
from clade_jax.evaluation.evaluate import evaluate
from clade_jax.training import train_and_evaluate
from clade_jax.training.loop import make_mesh

VARIANTS = {
    "pix2pixhd": "generator=pix2pixhd",
    "switchable_nobatch": "pfn=switchable_nobatch",
    # seed 003's whole system: unpooling, SPADE norms, switchable normalization
    "unpool_vaegan": "generator=unpool,norm=spade,pfn=switchable",
}


def _config(name: str):
    config = synthetic.get_config("tiny," + VARIANTS[name])
    config.image_every_steps = 0  # no sample grids: compiling the sampler cost 4-7 s per run
    return config


def _train(name: str, workdir: str):
    return train_and_evaluate(_config(name), workdir, mesh=make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="session")  # session: xdist may interleave other modules
def straight_runs(tmp_path_factory):
    """name -> (workdir, final state) of a 4-step run, trained on first use."""
    runs = {}

    def get(name: str):
        if name not in runs:
            workdir = str(tmp_path_factory.mktemp(name))
            runs[name] = workdir, _train(name, workdir)[1]
        return runs[name]

    return get


def _grouped(names):
    """One xdist group per variant: its tests share the variant's straight run."""
    return [pytest.param(n, marks=pytest.mark.xdist_group(n)) for n in names]


@pytest.mark.parametrize("name", _grouped(VARIANTS))
def test_tiny_training_resumes_exactly(name, straight_runs, tmp_path):
    """Restarting from the straight run's step-2 checkpoint and training to 4 reproduces its
    step-4 state bitwise (parameters, optimizer, running statistics, mixture weights)."""
    straight_dir, straight = straight_runs(name)
    assert sorted(os.listdir(os.path.join(straight_dir, "checkpoints"))) == ["2", "4"]
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))
    _, resumed = _train(name, resumed_dir)
    a, b = _leaves(straight), _leaves(resumed)
    assert a.keys() == b.keys()
    assert not [k for k in a if not np.array_equal(a[k], b[k])]
    if "pfn=switchable" in VARIANTS[name]:
        batch = not VARIANTS[name].endswith("_nobatch")
        mixture = [k for k in a if k.endswith("mean_weight")]
        assert mixture and all(a[k].shape == ((3,) if batch else (2,)) for k in mixture)
        running = [k for k in a if "running_mean" in k]
        assert bool(running) == batch  # the batch-free variant keeps no running statistics
        # The mixture weights are trained (they moved from their initial ones).
        assert any(not np.allclose(a[k], 1.0) for k in mixture)
    if name.startswith("unpool"):
        assert any(k.startswith("gen/g/encoder/conv5_4/") for k in a)  # VGG19's 16 convs


@pytest.mark.parametrize("name", _grouped(["switchable_nobatch", "unpool_vaegan"]))
def test_evaluates_end_to_end(name, straight_runs):
    workdir, _ = straight_runs(name)
    result = evaluate(workdir, compute_fid=False, max_images=8)
    assert result["num_images"] == 8 and result["step"] == 4
    assert len(os.listdir(os.path.join(workdir, "eval", "4", "images"))) == 8


@pytest.mark.slow(reason="switchable norm's gradients compiled for 1 and 8 devices (~50 s cold)")
def test_switchable_one_device_and_eight_devices_agree():
    """Switchable norm's batch statistics are global: 1 and 8 devices give the same losses,
    gradients and running statistics (with the CPU's fast convolution paths, as training runs).
    The whole `train_step` on 1 vs 8 devices is compared once, in test_training.py."""
    config = synthetic.get_config("tiny,pfn=switchable")
    config.model.num_D = 2  # as test_training's 1-vs-8 check (the tiny default has one scale)
    _one_vs_eight_devices(config, with_step=False)
