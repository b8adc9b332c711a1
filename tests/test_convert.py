"""`python -m clade_jax.convert`: an official checkpoint folder becomes a workdir that the rest of
the project loads like one of its own runs, with the official outputs."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import Fixture, nchw, rel_err
from flax import nnx

from clade_jax.convert import from_official, official_name_map
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


# --- the discriminator and encoder files, .pth files, and the options' branches -------------


def write_pth(path, state: dict) -> None:
    """`torch.save(net.state_dict(), path)` in torch's zip format, without torch: an OrderedDict
    of float32 tensors, one storage each."""
    from test_torch_io import Emitter, Global, emit_tensor

    e = Emitter()
    e.ordered_dict()
    e.mark()
    arrays = {}
    for i, (name, value) in enumerate(state.items()):
        arr = np.ascontiguousarray(value, np.float32)
        arrays[str(i)] = arr
        strides = tuple(int(s) // 4 for s in arr.strides)
        pid = ("storage", Global("torch", "FloatStorage"), str(i), "cpu", max(arr.size, 1))
        e.str(name)
        emit_tensor(e, pid, 0, arr.shape, strides)
    e.op(b"u")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", e.done())
        for key, arr in arrays.items():
            zf.writestr(f"archive/data/{key}", arr.tobytes())
        zf.writestr("archive/version", "3\n")


def _restored_state(workdir: str) -> tuple:
    """(config, the whole restored GANState) of a workdir."""
    from clade_jax.training import checkpoint
    from clade_jax.training.state import GANState

    config = checkpoint.load_config(workdir)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GANState(config, 1, rngs=nnx.Rngs(0))))
    manager = checkpoint.make_manager(workdir, with_data=False)
    state, _, _ = checkpoint.restore(manager, abstract)
    manager.close()
    return config, nnx.merge(graphdef, state)


def _flat(module) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module))}


def random_official_state(options: dict, kind: str, seed: int = 0) -> dict:
    """A random state dict in the official names and torch shapes of `kind` for `options`."""
    model = from_official(None, options, kind)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    rng = np.random.default_rng(seed)
    out = {}
    for name, (path, fn) in official_name_map(model).items():
        ours = tuple(flat[path].shape)
        # torch layouts: conv (out, in, kh, kw); linear (out, in); vectors and tables as ours
        candidates = [
            ours,
            ours[::-1],
            (ours[3], ours[2], ours[0], ours[1]) if len(ours) == 4 else (),
        ]
        shape = next(c for c in candidates if np.shape(fn(np.zeros(c, np.float32))) == ours)
        out[name] = rng.normal(0, 0.5, shape).astype(np.float32)
    return out


def test_generator_discriminator_and_encoder_pth_files_are_all_converted(tmp_path):
    """A VAE run's G, D and E as .pth files: each network of the workdir holds its file's
    weights (parameters and spectral-norm / BatchNorm buffers), not the official init. D and E
    are the official networks of the fixtures; G is random (no fixture generator has the
    encoder fixture's crop size)."""
    e_fx, d_fx = Fixture("spade_tiny_vae", "enc/"), Fixture("d_tiny")
    options = {**e_fx.options, "ndf": d_fx.options["ndf"]}  # one opt.txt for all three
    assert all(options[k] == d_fx.options[k] for k in ("label_nc", "n_layers_D", "num_D"))
    states = {
        "G": random_official_state(options, "G"),
        "D": d_fx.state,
        "E": {k: v for k, v in e_fx.state.items() if k != "eps"},  # enc/eps is an input
    }
    official = tmp_path / "official"
    official.mkdir()
    lines = [f"{k:>25}: {v!s:<30}" for k, v in sorted(options.items())]
    (official / "opt.txt").write_text("\n".join(["---- Options ----", *lines, "---- End ----"]))
    for kind, state in states.items():
        write_pth(official / f"latest_net_{kind}.pth", state)
    config, model = _restored_state(convert(str(official), str(tmp_path / "run")))
    assert config.model.use_vae and config.model.ndf == 16
    for kind, ours in (("G", model.gen.g), ("D", model.d), ("E", model.gen.e)):
        want = _flat(from_official(states[kind], options, kind))
        init = _flat(from_official(None, options, kind))
        got = _flat(ours)
        assert got.keys() == want.keys(), kind
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=f"{kind} {path}")
        assert all(not np.array_equal(want[p], init[p]) for p in want if p[-1] == "kernel")


def test_unknown_dataset_mode_is_an_error_naming_value_file_and_known_modes(tmp_path):
    """An official dataset_mode without a clade_jax preset (e.g. facades) is an error, not a silent
    custom preset; `custom` converts with classes, don't-care and instance use from the options."""
    options = {"dataset_mode": "facades", "label_nc": 12, "contain_dontcare_label": True}
    with pytest.raises(ValueError, match=r"dataset_mode='facades' in the options.*custom"):
        config_from_options(options)
    fx = Fixture("clade_tiny")
    write_official_dir(tmp_path, fx, extra={"dataset_mode": "facades"})
    known = r"known modes: ade20k, coco, cityscapes, custom"
    with pytest.raises(ValueError, match=rf"'facades' in {tmp_path}/opt\.txt .*{known}"):
        convert(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    c = config_from_options({**options, "dataset_mode": "custom"})
    assert c.data.dataset == "custom"
    assert (c.data.num_classes, c.data.dontcare_label, c.data.use_instance) == (13, 12, True)
    assert config_from_options({"label_nc": 5}).data.dataset == "custom"  # no dataset_mode
    for mode, dataset in (
        ("ade20k", "ade20k"),
        ("coco", "coco_stuff"),
        ("cityscapes", "cityscapes"),
    ):
        assert config_from_options({"dataset_mode": mode, "label_nc": 5}).data.dataset == dataset


def test_no_ttur_uses_one_learning_rate_and_the_pix2pixhd_betas():
    c = config_from_options({"label_nc": 5, "lr": 0.0003, "no_TTUR": True})
    assert (c.optim.lr_g, c.optim.lr_d, c.optim.beta1, c.optim.beta2) == (3e-4, 3e-4, 0.5, 0.999)
    c = config_from_options({"label_nc": 5, "lr": 0.0003, "beta1": 0.1, "beta2": 0.95})
    assert (c.optim.lr_g, c.optim.lr_d, c.optim.beta1, c.optim.beta2) == (1.5e-4, 6e-4, 0.1, 0.95)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"netG": "pix2pixhd"}, r"netG 'pix2pixhd'"),
        ({"norm_G": "spectralinstance"}, r"unsupported norm_G 'spectralinstance'"),
        ({"norm_G": "spectralspadegroup3x3"}, r"norm_G 'spectralspadegroup3x3'.*'group'"),
        ({"norm_G": "spectralspadesyncbatch5x5"}, r"norm_G 'spectralspadesyncbatch5x5'.*kernel 5"),
    ],
)
def test_unsupported_generator_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        config_from_options({"label_nc": 5, **options})
    with pytest.raises(ValueError, match=message.split(r"'")[0]):
        from_official(None, {"label_nc": 5, "crop_size": 64, **options}, "G")
