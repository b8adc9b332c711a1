"""`clade_jax.synthesize`: label PNGs in, images out; validation, multi-modal and style-guided.

The workdirs here are initialized, not trained (config.json + an orbax checkpoint at step 0
without data state: the layout `python -m clade_jax.convert` writes), which keeps the tests fast;
what is checked is that the files reach the generator exactly as the model's inputs would.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import initial_state
from flax import nnx
from PIL import Image

from clade_jax.configs import synthetic as synthetic_config
from clade_jax.data import synthetic
from clade_jax.data.layouts import DataError
from clade_jax.inference import InferenceModel, load_inference_model, to_uint8
from clade_jax.layers.labels import icpe_offsets
from clade_jax.models.encoder import reparameterize
from clade_jax.synthesize import synthesize
from clade_jax.training import checkpoint


def make_initialized_workdir(config, workdir: str) -> str:
    """config.json + checkpoints/0 (state only) of a freshly initialized model."""
    checkpoint.write_config(config, workdir)
    state = initial_state(config, config.seed)[1]
    manager = checkpoint.make_manager(workdir, with_data=False)
    checkpoint.save(manager, 0, state, force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir


def write_png(path, array) -> str:
    Image.fromarray(np.asarray(array)).save(path)
    return str(path)


def scene(index: int, size: int = 64) -> dict:
    return synthetic.generate_scene(index, size, size, split="validation")


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A tiny VAE workdir and its restored model (restored once, reused by the tests)."""
    workdir = make_initialized_workdir(
        synthetic_config.get_config("tiny,vae"), str(tmp_path_factory.mktemp("vae"))
    )
    config, g, e, _ = checkpoint.load_models(workdir)
    return workdir, (config, InferenceModel(g, e)), g, e


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory):
    """Three label PNGs (uint8 class ids): two at the model's 64x64, one at 48x48."""
    folder = tmp_path_factory.mktemp("labels")
    for i, size in enumerate((64, 64, 48)):
        write_png(folder / f"map{i}.png", scene(i, size)["label"].astype(np.uint8))
    return folder


def test_multimodal_samples_differ_by_seed_and_repeat_for_the_same_seed(
    vae_run, labels_dir, tmp_path
):
    workdir, model, g, e = vae_run
    a = synthesize(workdir, labels_dir, tmp_path / "a", num_samples=2, seed=1, model=model)
    b = synthesize(workdir, labels_dir, tmp_path / "b", num_samples=2, seed=1, model=model)
    c = synthesize(workdir, labels_dir, tmp_path / "c", num_samples=2, seed=2, model=model)
    assert [p.name for p in a] == [f"map{i}_sample{k}.png" for i in range(3) for k in range(2)]
    imgs = {name: [read(p) for p in files] for name, files in (("a", a), ("b", b), ("c", c))}
    for x in imgs["a"]:
        assert x.shape == (64, 64, 3) and x.dtype == np.uint8  # the 48x48 map was resized
    for x, y in zip(imgs["a"], imgs["b"], strict=True):
        np.testing.assert_array_equal(x, y)  # same seed, same images
    for x, y in zip(imgs["a"], imgs["c"], strict=True):
        assert np.abs(x.astype(int) - y).mean() > 0.5  # another seed, other images
    assert np.abs(imgs["a"][0].astype(int) - imgs["a"][1]).mean() > 0.5  # two samples differ


def test_sample_is_the_generator_on_the_file_with_z_from_the_seed(vae_run, labels_dir, tmp_path):
    workdir, model, g, e = vae_run
    (path,) = synthesize(workdir, [labels_dir / "map0.png"], tmp_path, seed=3, model=model)
    assert path.name == "map0.png"
    label = scene(0)["label"][None]
    z = jax.random.normal(jax.random.fold_in(jax.random.key(3), 0), (1, g.z_dim))
    expected = to_uint8(g(label, z=z))[0]
    assert np.abs(read(path).astype(int) - expected).max() <= 1  # jit vs eager rounding


def test_style_guided_uses_the_encoder_posterior_of_the_style_image(vae_run, labels_dir, tmp_path):
    workdir, model, g, e = vae_run
    style = write_png(tmp_path / "style.png", scene(5)["image"])
    other = write_png(tmp_path / "other.png", scene(6)["image"])
    labels = [labels_dir / "map0.png"]
    (s1,) = synthesize(workdir, labels, tmp_path / "s1", style=style, seed=0, model=model)
    (s2,) = synthesize(workdir, labels, tmp_path / "s2", style=other, seed=0, model=model)
    (prior,) = synthesize(workdir, labels, tmp_path / "p", seed=0, model=model)
    image = scene(5)["image"][None].astype(np.float32) / 127.5 - 1.0
    mu, logvar = e(image)
    z = reparameterize(mu, logvar, jax.random.fold_in(jax.random.key(0), 0))
    expected = to_uint8(g(scene(0)["label"][None], z=z))[0]
    assert np.abs(read(s1).astype(int) - expected).max() <= 1
    assert np.abs(read(s1).astype(int) - read(s2)).mean() > 0.5
    assert np.abs(read(s1).astype(int) - read(prior)).mean() > 0.5


def test_out_of_range_values_name_the_file_and_the_values(vae_run, tmp_path):
    workdir, model, g, e = vae_run
    label = scene(0)["label"].astype(np.uint8)
    label[:3, :3] = 12
    label[10, 10] = 255
    bad = write_png(tmp_path / "bad_map.png", label)
    with pytest.raises(DataError, match=r"bad_map\.png.*outside \[0, 10\): 12, 255"):
        synthesize(workdir, bad, tmp_path / "out", model=model)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_non_image_and_colour_files_are_rejected_by_name(vae_run, tmp_path):
    workdir, model, g, e = vae_run
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"cannot read label/instance map .*notes\.png"):
        synthesize(workdir, text, tmp_path / "out", model=model)
    rgb = write_png(tmp_path / "colour.png", scene(0)["image"])
    with pytest.raises(DataError, match=r"colour\.png.*single-channel"):
        synthesize(workdir, rgb, tmp_path / "out", model=model)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        synthesize(workdir, tmp_path / "missing.png", tmp_path / "out", model=model)


def _blocks(values, size: int = 64) -> np.ndarray:
    """A (size, size) uint8 map of vertical stripes, one per value."""
    stripes = np.repeat(np.asarray(values, np.uint8), -(-size // len(values)))[:size]
    return np.broadcast_to(stripes[None, :], (size, size)).copy()


def _untrained(dataset: str):
    """(config, InferenceModel) of an initialized tiny generator for a real data set's classes
    (the class tables are random at init, so every class gives other pixels)."""
    from clade_jax.configs import ade20k, coco_stuff
    from clade_jax.models.build import build_generator

    config = {"ade20k": ade20k, "coco_stuff": coco_stuff}[dataset].get_config("tiny")
    config.data.use_instance = False
    g = build_generator(config, rngs=nnx.Rngs(0))
    g.eval()
    return config, InferenceModel(g)


@pytest.mark.parametrize(
    "dataset, raw_values, ids",
    [
        # ADE20k: raw 0 ("unknown") is the don't-care class 150, raw k is class k - 1.
        ("ade20k", [0, 1, 3, 27, 150], [150, 0, 2, 26, 149]),
        # COCO-Stuff: raw 255 ("unlabeled") is the don't-care class 182, other ids are kept.
        ("coco_stuff", [0, 5, 181, 255], [0, 5, 181, 182]),
    ],
)
def test_dataset_encoding_is_applied_when_asked(dataset, raw_values, ids, tmp_path):
    """label_encoding='dataset' reads the data set's own annotation PNG: the image is the one of
    the remapped class ids, not the one of the raw values read as ids."""
    model = _untrained(dataset)
    raw = write_png(tmp_path / "raw.png", _blocks(raw_values))
    remapped = write_png(tmp_path / "ids.png", _blocks(ids))
    (a,) = synthesize("untrained", raw, tmp_path / "a", label_encoding="dataset", model=model)
    (b,) = synthesize("untrained", remapped, tmp_path / "b", model=model)
    np.testing.assert_array_equal(read(a), read(b))
    if dataset == "coco_stuff":  # 255 is no class id: read as ids it is an error
        with pytest.raises(DataError, match=r"raw\.png.*outside \[0, 183\): 255"):
            synthesize("untrained", raw, tmp_path / "c", model=model)
    else:  # raw ADE20k values are valid ids of other classes: another image
        (c,) = synthesize("untrained", raw, tmp_path / "c", model=model)
        assert np.abs(read(c).astype(int) - read(b)).mean() > 0.5
    with pytest.raises(ValueError, match="label encoding"):
        synthesize("untrained", raw, tmp_path / "d", label_encoding="rgb", model=model)


def test_icpe_and_instance_model(tmp_path):
    """ICPE maps are computed from the (resized) label map; instance maps are required and read."""
    config = synthetic_config.get_config("tiny,icpe")
    config.data.use_instance = True
    workdir = make_initialized_workdir(config, str(tmp_path / "run"))
    model = load_inference_model(workdir)[:2]
    ex = scene(2)
    label = write_png(tmp_path / "scene.png", ex["label"].astype(np.uint8))
    (tmp_path / "inst").mkdir()
    write_png(tmp_path / "inst" / "scene.png", ex["instance"].astype(np.uint16))
    with pytest.raises(ValueError, match="instance maps"):
        synthesize(workdir, label, tmp_path / "out", model=model)
    with pytest.raises(ValueError, match="no latent code"):
        synthesize(
            workdir,
            label,
            tmp_path / "out",
            num_samples=2,
            instances=tmp_path / "inst",
            model=model,
        )
    with pytest.raises(ValueError, match="VAE encoder"):
        synthesize(
            workdir, label, tmp_path / "out", style=label, instances=tmp_path / "inst", model=model
        )
    (path,) = synthesize(workdir, label, tmp_path / "out", instances=tmp_path / "inst", model=model)
    # The file reached the (already compiled) model as the pipeline's inputs would.
    icpe = icpe_offsets(ex["label"], ignore=(synthetic.DONTCARE,))
    expected = model[1](ex["label"][None], instance=ex["instance"][None], icpe=icpe[None])
    np.testing.assert_array_equal(read(path), to_uint8(expected)[0])
    without_icpe = model[1](ex["label"][None], instance=ex["instance"][None], icpe=0 * icpe[None])
    assert np.abs(read(path).astype(int) - to_uint8(without_icpe)[0]).mean() > 0.1


def test_converted_official_checkpoint_reproduces_the_official_output(fixture, tmp_path):
    """Label PNGs through a workdir made by `clade_jax.convert` from the official CLADE weights of
    the parity fixture give the official PyTorch output: exactly, except one level on values
    within float rounding of a quantization boundary."""
    from clade_jax.convert.workdir import convert

    fx = fixture("clade_tiny")
    official = tmp_path / "official"
    official.mkdir()
    lines = [f"{k:>25}: {v!s:<30}" for k, v in sorted(fx.options.items())]
    (official / "opt.txt").write_text("\n".join(["---- Options ----", *lines, "---- End ----"]))
    np.savez(official / "latest_net_G.npz", **fx.state)
    workdir = str(tmp_path / "run")
    convert(str(official), workdir)

    labels = np.asarray(fx["input/label"])
    paths = [write_png(tmp_path / f"map{i}.png", x.astype(np.uint8)) for i, x in enumerate(labels)]
    files = synthesize(workdir, paths, tmp_path / "out")
    official_float = np.transpose(fx["output/image"], (0, 2, 3, 1))  # NCHW -> NHWC
    official_images = to_uint8(official_float)
    # The float outputs match the official ones to ~1e-6 (test_parity), and the CPU sums the
    # one-hot `fc` as a gather in another order, so a value whose scaled level (x + 1) / 2 * 255
    # lies within 1e-3 of an integer may truncate one level apart. Every other value must be
    # exact, and those within 1e-3 may differ by one level only.
    scaled = (official_float.astype(np.float64) + 1) / 2 * 255
    near_boundary = np.abs(scaled - np.rint(scaled)) < 1e-3
    assert near_boundary.mean() < 0.01, near_boundary.mean()  # the exemption stays tiny
    for path, expected, near in zip(files, official_images, near_boundary, strict=True):
        diff = np.abs(read(path).astype(np.int16) - expected.astype(np.int16))
        assert np.array_equal(diff[~near], np.zeros_like(diff[~near])), np.argwhere(diff * ~near)
        assert diff.max() <= 1, diff.max()
