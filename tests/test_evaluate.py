"""`evaluate` end to end on a tiny trained run: images, FID (real Inception), segmentation scores.

A copy of conftest's tiny run (the synthetic config, 4 steps on 8 devices) is evaluated several
ways. The segmenter is injected (a `CallableSegmenter` that always predicts
one class, and the same through the registry), so the expected mIoU and pixel accuracy can be
computed by hand from the label maps.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import TINY_RUN_GROUP
from flax import nnx
from PIL import Image

from clade_jax.configs import synthetic as synthetic_config
from clade_jax.data import make_eval_iterator
from clade_jax.evaluation import fid, registry, segmentation
from clade_jax.evaluation.evaluate import evaluate, fid_stats_stem
from clade_jax.inference import to_uint8
from clade_jax.models.encoder import reparameterize
from clade_jax.training import checkpoint
from clade_jax.training.state import GANState

CONSTANT_CLASS = 0  # the fake segmenter's prediction everywhere

# One xdist worker runs this module and test_training.py: they share conftest's `tiny_run`.
pytestmark = pytest.mark.xdist_group(TINY_RUN_GROUP)


@pytest.fixture(scope="session")
def run(tiny_run, tmp_path_factory):
    """A copy of conftest's tiny run (evaluation writes into its workdir)."""
    workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
    shutil.copytree(tiny_run[1], workdir)
    return workdir


def real_examples(config, count: int) -> dict:
    """The first `count` validation examples as the pipeline gives them (label, image, name)."""
    out = {"label": [], "image": [], "name": []}
    for batch in make_eval_iterator(config.data, batch_size=8, process_index=0, process_count=1):
        keep = np.asarray(batch["mask"], bool)
        for key in out:
            out[key].extend(np.asarray(batch[key])[keep])
        if len(out["name"]) >= count:
            break
    return {k: np.stack(v[:count]) for k, v in out.items()}


def constant_segmenter(calls: list) -> segmentation.CallableSegmenter:
    def fn(images):
        calls.append(np.array(images))
        logits = np.zeros((*images.shape[:3], 10), np.float32)
        logits[..., CONSTANT_CLASS] = 1.0
        return logits

    return segmentation.CallableSegmenter(fn, 10, input_format="uint8")


if "eval_test_constant" not in registry.available_segmenters():
    registry.register_segmenter("eval_test_constant")(lambda: constant_segmenter([]))


def colour_features(images: np.ndarray) -> np.ndarray:
    """A cheap stand-in for Inception: per-channel means and standard deviations (N, 6)."""
    x = np.asarray(images, np.float64).reshape(len(images), -1, 3)
    return np.concatenate([x.mean(1), x.std(1)], axis=1)


def test_evaluate_writes_images_json_and_a_finite_fid(run, tmp_path):
    """The real Inception network on 4 synthesized and 4 real images."""
    stats_dir = tmp_path / "fid_stats"
    result = evaluate(run, max_images=4, fid_stats_dir=stats_dir)
    config = checkpoint.load_config(run)
    assert result["step"] == 4 and result["split"] == "validation" and result["num_images"] == 4
    assert result["segmenter"] is None and result["miou"] is None  # none configured: skipped
    with open(os.path.join(run, "eval", "4.json")) as f:
        assert json.load(f) == result
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    stats = fid.statistics_path(fid_stats_stem(config.data, "validation", stats_dir), 4, (64, 64))
    assert result["fid_real_stats"] == str(stats) and stats.is_file()
    with np.load(stats) as z:
        assert z["mu"].shape == (fid.FEATURE_DIM,)


def test_images_are_the_generator_output_and_fid_compares_them_with_the_real_set(run, tmp_path):
    """config.eval.max_images (8) examples: one PNG per example, named after it, equal to the
    generator's output for its label map; FID (with a cheap extractor) is the distance between
    exactly these images and the real ones, whose statistics are cached and reused."""
    stats_dir = tmp_path / "fid_stats"
    result = evaluate(run, fid_stats_dir=stats_dir, inception=colour_features)
    config = checkpoint.load_config(run)
    n = config.eval.max_images
    assert result["num_images"] == n == 8
    real = real_examples(config, n)
    images_dir = os.path.join(run, "eval", "4", "images")
    assert sorted(os.listdir(images_dir)) == sorted(f"{name}.png" for name in real["name"])
    fakes = np.stack([np.asarray(Image.open(f"{images_dir}/{name}.png")) for name in real["name"]])
    _, g, _, _ = checkpoint.load_models(run)
    expected = to_uint8(nnx.jit(lambda g, x: g(x))(g, real["label"]))
    assert np.abs(fakes.astype(int) - expected).max() <= 1
    grid = np.asarray(Image.open(result["grid"]))
    assert grid.shape == (n * 64, 3 * 64, 3)  # rows of label | synthesized | real

    real_u8 = segmentation.images_to_uint8(real["image"])
    want = fid.frechet_distance(
        *fid.statistics(colour_features(fakes)), *fid.statistics(colour_features(real_u8))
    )
    assert result["fid"] == pytest.approx(want, rel=1e-9)

    stats = fid.statistics_path(fid_stats_stem(config.data, "validation", stats_dir), n, (64, 64))
    mtime = stats.stat().st_mtime_ns
    calls = []
    counting = lambda x: calls.append(len(x)) or colour_features(x)
    again = evaluate(run, fid_stats_dir=stats_dir, inception=counting)
    assert again["fid"] == result["fid"] and stats.stat().st_mtime_ns == mtime
    assert sum(calls) == n  # only the synthesized images: the real statistics came from the cache
    with pytest.raises(ValueError, match="fid_stats_dir"):
        evaluate(run, inception=colour_features)


def test_segmentation_scores_over_the_whole_split_each_example_once(run, tmp_path):
    """max_images=0: all 64 examples, batch 12 (the last batch is padded); the segmenter sees the
    synthesized images, then the real ones, and its scores are computed against the labels."""
    calls = []
    result = evaluate(
        run,
        max_images=0,
        batch_size=12,
        compute_fid=False,
        segmenter=constant_segmenter(calls),
        step=2,
    )
    config = checkpoint.load_config(run)
    total = config.data.synthetic_val_size
    real = real_examples(config, total)
    assert result["step"] == 2 and result["num_images"] == total and result["fid"] is None
    images_dir = os.path.join(run, "eval", "2", "images")
    assert sorted(os.listdir(images_dir)) == sorted(f"{name}.png" for name in real["name"])

    first = np.asarray(Image.open(f"{images_dir}/{real['name'][0]}.png"))
    np.testing.assert_array_equal(calls[0][0], first)  # fakes first ...
    np.testing.assert_array_equal(calls[1][0], segmentation.images_to_uint8(real["image"][:1])[0])

    labels = real["label"][real["label"] != config.data.dontcare_label]
    hits = np.mean(labels == CONSTANT_CLASS)
    present = len(set(np.unique(labels)) | {CONSTANT_CLASS})
    assert result["pixel_accuracy"] == pytest.approx(hits)
    assert result["miou"] == pytest.approx(hits / present)  # IoU of the class, 0 for the others
    assert result["real_pixel_accuracy"] == pytest.approx(hits)  # same constant on real images


def test_segmenter_by_registry_name(run):
    result = evaluate(run, segmenter="eval_test_constant", compute_fid=False, max_images=4)
    assert result["segmenter"] == "eval_test_constant" and 0 < result["pixel_accuracy"] < 1


def test_vae_model_in_converted_layout_uses_the_posterior_of_the_real_image(tmp_path):
    """A config.json + checkpoints/0 workdir without data state (what the converter writes) with
    a VAE: each image is G(label, z ~ E(real image)) with z keyed by the example index."""
    config = synthetic_config.get_config("tiny,vae")
    workdir = str(tmp_path / "converted")
    checkpoint.write_config(config, workdir)
    manager = checkpoint.make_manager(workdir, with_data=False)
    checkpoint.save(manager, 0, nnx.state(GANState(config, 16, rngs=nnx.Rngs(0))), force=True)
    manager.wait_until_finished()
    manager.close()

    result = evaluate(workdir, compute_fid=False, max_images=3, seed=5)
    assert result["step"] == 0 and result["num_images"] == 3 and "posterior" in result["z"]
    real = real_examples(config, 3)
    _, g, e, _ = checkpoint.load_models(workdir)
    mu, logvar = e(real["image"][2:3])
    z = reparameterize(mu, logvar, jax.random.fold_in(jax.random.key(5), 2))
    expected = to_uint8(g(real["label"][2:3], z=z))[0]
    got = np.asarray(Image.open(os.path.join(result["images_dir"], f"{real['name'][2]}.png")))
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_builtin_segmenter_named_in_the_config(run, tmp_path):
    """`config.eval.segmenter_workdir` names a segmenter trained with configs/segmenter.py; its
    scores on the written images are what evaluate reports."""
    from clade_jax.configs import segmenter as segmenter_config
    from clade_jax.evaluation.segmenter import load_segmenter, train_segmenter

    seg_config = segmenter_config.get_config("dataset=synthetic,tiny,steps=4")
    seg_config.eval.at_end = False
    seg_dir = str(tmp_path / "seg")
    train_segmenter(seg_config, seg_dir)
    workdir = str(tmp_path / "run")
    shutil.copytree(run, workdir, ignore=shutil.ignore_patterns("eval"))
    config = checkpoint.load_config(workdir)
    config.eval.segmenter_workdir = seg_dir
    checkpoint.write_config(config, workdir)

    result = evaluate(workdir, compute_fid=False, max_images=4)
    assert result["segmenter"] == f"builtin:{seg_dir}"
    real = real_examples(config, 4)
    fakes = np.stack(
        [np.asarray(Image.open(f"{result['images_dir']}/{n}.png")) for n in real["name"]]
    )
    want = segmentation.evaluate_segmentation(
        load_segmenter(seg_dir), fakes, real["label"], num_classes=10, ignore_label=9
    )
    assert result["miou"] == pytest.approx(want["miou"])
    assert result["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])
