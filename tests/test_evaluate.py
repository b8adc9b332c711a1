"""`evaluate` end to end on a tiny trained run: images, FID, segmentation scores, protocols.

A copy of conftest's tiny run (the synthetic config, 4 steps on 8 devices) is evaluated several
ways. Every expected value is computed independently of the evaluation pipeline: the scenes are
drawn with `synthetic.generate_scene` (not the loader), resized with PIL here, the images are read
back from the PNGs, and the scores are worked out with NumPy. The injected networks are exact
integer computations (`test_evaluators`): a segmenter that classifies pixels by colour (so the
synthesized and the real images get different confusion matrices) and per-channel pixel sums as
FID features (a well-conditioned covariance on a few images).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import two_processes as mp
from conftest import TINY_RUN_GROUP
from flax import nnx
from PIL import Image
from test_evaluators import colour_classes_np, colour_segmenter, half_sums, half_sums_np

from clade_jax.configs import synthetic as synthetic_config
from clade_jax.data import synthetic
from clade_jax.evaluation import fid, registry, segmentation
from clade_jax.evaluation.evaluate import evaluate, fid_stats_stem
from clade_jax.evaluation.evaluators import common
from clade_jax.inference import to_uint8
from clade_jax.models.encoder import reparameterize
from clade_jax.training import checkpoint, runtime
from clade_jax.training.state import GANState

REPO = Path(__file__).resolve().parents[1]
K, DONTCARE = 10, 9
FEATURES = (half_sums, {})

# One xdist worker runs this module and test_training.py: they share conftest's `tiny_run`.
pytestmark = pytest.mark.xdist_group(TINY_RUN_GROUP)


@pytest.fixture(scope="session")
def run(tiny_run, tmp_path_factory):
    """A copy of conftest's tiny run (evaluation writes into its workdir)."""
    workdir = str(tmp_path_factory.mktemp("evaluate") / "run")
    shutil.copytree(tiny_run[1], workdir)
    return workdir


@pytest.fixture(scope="module")
def vivid(tmp_path_factory):
    """A converted-layout VAE workdir (config.json + checkpoints/0, no data state) whose random
    generator has its output convolution scaled up, so the images vary from pixel to pixel
    (the 4-step tiny run's are a uniform grey) and any mix-up of rows or pixels shows."""
    config = synthetic_config.get_config("tiny,vae")
    workdir = str(tmp_path_factory.mktemp("vivid") / "run")
    checkpoint.write_config(config, workdir)
    init = jax.jit(lambda key: nnx.split(GANState(config, 16, rngs=nnx.Rngs(key)))[1])
    state = init(runtime.init_key(0))
    kernel = state["gen"]["g"]["conv_img"]["kernel"]
    kernel.set_value(kernel[...] * 4.0)
    manager = checkpoint.make_manager(workdir, with_data=False)
    checkpoint.save(manager, 0, state, force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir


def scenes(config, split: str, count: int, size: int | None = None, resample=Image.BICUBIC):
    """The first `count` scenes of a split drawn directly (not through the loader), images
    resized to the output size with PIL `resample` and labels with PIL nearest when the scenes
    are rendered at another size."""
    d = config.data
    res = int(d.synthetic_resolution)
    size = size or int(d.crop_size)
    out = {"label": [], "image": [], "name": []}
    for i in range(count):
        s = synthetic.generate_scene(i, res, res, seed=0, split=split)
        image, label = s["image"], s["label"]
        if res != size:
            image = np.asarray(Image.fromarray(image).resize((size, size), resample))
            label = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((size, size), 0))
        out["image"].append(image)
        out["label"].append(label.astype(np.int32))
        out["name"].append(f"synthetic_{split}_{i:07d}")
    return {k: np.stack(v) if k != "name" else v for k, v in out.items()}


def read_pngs(result, names) -> np.ndarray:
    return np.stack([np.asarray(Image.open(f"{result['images_dir']}/{n}.png")) for n in names])


def generator_images(workdir, real, seed: int = 0) -> np.ndarray:
    """The generator on the scenes, outside the evaluation code: VAE models with z drawn from
    the encoder's posterior of the real image, keyed by the example index."""
    _, g, e, _ = checkpoint.load_models(workdir)
    z = None
    if e is not None:
        mu, logvar = e(real["image"].astype(np.float32) / 127.5 - 1)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
            jnp.arange(len(real["label"]))
        )
        z = jax.vmap(reparameterize)(mu, logvar, keys)
    return to_uint8(g(real["label"], z=z))


def features_fid(fakes, reals) -> float:
    return fid.frechet_distance(
        *fid.statistics(half_sums_np(fakes)), *fid.statistics(half_sums_np(reals))
    )


def test_evaluate_writes_images_json_and_a_finite_fid(run, tmp_path):
    """The trained tiny run with the real Inception network on 4 synthesized and 4 real images."""
    stats_dir = tmp_path / "fid_stats"
    result = evaluate(run, max_images=4, fid_stats_dir=stats_dir)
    config = checkpoint.load_config(run)
    assert result["step"] == 4 and result["split"] == "validation" and result["num_images"] == 4
    assert result["protocol"] == "native"
    assert result["segmenter"] is None and result["miou"] is None  # none configured: skipped
    with open(os.path.join(run, "eval", "4.json")) as f:
        assert json.load(f) == result
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    stats = fid.statistics_path(fid_stats_stem(config.data, "validation", stats_dir), 4, (64, 64))
    assert result["fid_real_stats"] == str(stats) and stats.is_file()
    with np.load(stats) as z:
        assert z["mu"].shape == (fid.FEATURE_DIM,)


def test_segmenter_by_registry_name(run):
    name = "eval_test_constant"
    if name not in registry.available_segmenters():
        constant = lambda x: np.eye(K, dtype=np.float32)[np.zeros(x.shape[:3], int)]
        registry.register_segmenter(name)(lambda: segmentation.CallableSegmenter(constant, K))
    result = evaluate(run, segmenter=name, compute_fid=False, max_images=4)
    assert result["segmenter"] == name and 0 < result["pixel_accuracy"] < 1


def test_bad_segmenter_input_is_an_error_naming_it(run, tmp_path):
    with pytest.raises(ValueError, match=r"predicts 12 classes but synthetic has 10"):
        evaluate(run, compute_fid=False, max_images=2, segmenter=colour_segmenter(k=12))
    with pytest.raises(
        ValueError,
        match=r"labels \[.*\] of synthetic \(protocol native\) are outside the segmenter's "
        r"classes \(colour\+0, 5 classes\)",
    ):
        evaluate(run, compute_fid=False, max_images=2, segmenter=colour_segmenter(k=5))
    with pytest.raises(ValueError, match=r"unknown eval.protocol 'pix2pix'"):
        evaluate(run, compute_fid=False, max_images=2, protocol="pix2pix")
    with pytest.raises(ValueError, match=r"protocol 'clade' .* not 'synthetic'"):
        evaluate(run, compute_fid=False, max_images=2, protocol="clade")
    with pytest.raises(ValueError, match=r"segmenter 'drn_d_105' needs .*--segmenter_weights"):
        evaluate(run, compute_fid=False, max_images=2, segmenter="drn_d_105")
    from clade_jax.evaluation.segmenters import WeightsError

    bad = tmp_path / "drn-d-105_ms_cityscapes.pth"
    bad.write_bytes(b"not a checkpoint")
    for weights in (bad, tmp_path / "missing.pth"):
        with pytest.raises(WeightsError, match=str(weights)):
            evaluate(
                run, compute_fid=False, max_images=2, segmenter="drn_d_105",
                segmenter_weights=str(weights),
            )  # fmt: skip


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
    real = scenes(config, "validation", 4)
    fakes = read_pngs(result, real["name"])
    want = segmentation.evaluate_segmentation(
        load_segmenter(seg_dir), fakes, real["label"], num_classes=K, ignore_label=DONTCARE
    )
    assert result["miou"] == pytest.approx(want["miou"])
    assert result["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])


def test_images_fid_and_segmentation_match_an_independent_computation(vivid, tmp_path):
    """config.eval.max_images (8) examples: one PNG per example, named after it, equal to the
    generator's output for its scene (z from the encoder's posterior of the real image, keyed by
    the example index); FID between exactly these images and the same real examples; the
    confusion matrices of the synthesized and of the real images are each the colour
    segmenter's, worked out with NumPy (and differ from each other)."""
    stats_dir = tmp_path / "fid_stats"
    result = evaluate(
        vivid, fid_stats_dir=stats_dir, inception=FEATURES, segmenter=colour_segmenter(), seed=5
    )
    config = checkpoint.load_config(vivid)
    n = config.eval.max_images
    assert result["num_images"] == n == 8 and result["step"] == 0 and "posterior" in result["z"]
    real = scenes(config, "validation", n)
    assert sorted(os.listdir(result["images_dir"])) == sorted(f"{x}.png" for x in real["name"])
    fakes = read_pngs(result, real["name"])
    assert fakes.std() > 40  # images that vary
    assert np.abs(fakes.astype(int) - generator_images(vivid, real, seed=5)).max() <= 1
    grid = np.asarray(Image.open(result["grid"]))
    assert grid.shape == (n * 64, 3 * 64, 3)  # rows of label | synthesized | real

    assert result["fid"] == pytest.approx(features_fid(fakes, real["image"]), rel=1e-6)
    conf = segmentation.confusion_matrix(colour_classes_np(fakes), real["label"], K, DONTCARE)
    conf_real = segmentation.confusion_matrix(
        colour_classes_np(real["image"]), real["label"], K, DONTCARE
    )
    assert not np.array_equal(conf, conf_real)
    np.testing.assert_array_equal(result["confusion"], conf)
    want, want_real = (segmentation.segmentation_metrics(c, DONTCARE) for c in (conf, conf_real))
    assert result["miou"] == pytest.approx(want["miou"])
    assert result["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])
    assert result["real_miou"] == pytest.approx(want_real["miou"])
    assert result["real_pixel_accuracy"] == pytest.approx(want_real["pixel_accuracy"])

    # The real statistics are cached: a second evaluation extracts features of the fakes only.
    stats = Path(result["fid_real_stats"])
    mtime = stats.stat().st_mtime_ns
    calls = []
    counting = lambda x: calls.append(len(x)) or half_sums_np(x)
    again = evaluate(vivid, fid_stats_dir=stats_dir, inception=counting, seed=5)
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9)
    # A 2-image probe (the feature size), then one batch of the 8 fakes; no real images.
    assert stats.stat().st_mtime_ns == mtime and calls == [2, 8]
    with pytest.raises(ValueError, match="fid_stats_dir"):
        evaluate(vivid, inception=FEATURES)


_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
from clade_jax import distributed
distributed.initialize("127.0.0.1:{port}", 2, {pid})
from test_evaluators import colour_segmenter, half_sums
from clade_jax.evaluation.evaluate import evaluate
r = evaluate({workdir!r}, max_images=0, batch_size=12, fid_stats_dir={stats!r},
             inception=(half_sums, {{}}), segmenter=colour_segmenter())
print("RESULT", json.dumps({{"fid": r["fid"], "confusion": r["confusion"]}}))
"""


def test_two_processes_eight_devices_and_one_device_agree(vivid, tmp_path):
    """The whole split (64 examples, batch 12 rounded up to 16, the last batch padded): 2
    `jax.distributed` processes with 4 devices each == 1 process with 8 devices == 1 device:
    identical confusion matrices and images, FID equal to 1e-6 relative, every example's PNG
    written once (each process writes its own)."""
    workdir = str(tmp_path / "run")
    shutil.copytree(vivid, workdir, ignore=shutil.ignore_patterns("eval"))
    port = mp.free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": mp.xla_flags(4),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WORKER.format(
                    tests=str(REPO / "tests"),
                    port=port,
                    pid=i,
                    workdir=workdir,
                    stats=str(tmp_path / f"stats{i}"),
                ),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    config = checkpoint.load_config(vivid)
    total = config.data.synthetic_val_size
    real = scenes(config, "validation", total)
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        r = evaluate(
            vivid, max_images=0, batch_size=12, fid_stats_dir=tmp_path / f"stats_{len(devices)}",
            inception=FEATURES, segmenter=colour_segmenter(), mesh=common.make_mesh(devices),
        )  # fmt: skip
        assert r["num_images"] == total == 64
        results.append((r, read_pngs(r, real["name"])))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    two = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outputs]
    assert two[0] == two[1]
    assert len(os.listdir(f"{workdir}/eval/0/images")) == total
    two_images = read_pngs({"images_dir": f"{workdir}/eval/0/images"}, real["name"])

    conf = segmentation.confusion_matrix(colour_classes_np(two_images), real["label"], K, DONTCARE)
    want_fid = features_fid(two_images, real["image"])
    for r, images in results:
        np.testing.assert_array_equal(images, two_images)
        np.testing.assert_array_equal(r["confusion"], conf)
        assert r["fid"] == pytest.approx(want_fid, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(two[0]["confusion"]), conf)
    assert two[0]["fid"] == pytest.approx(results[0][0]["fid"], rel=1e-6)
    assert results[1][0]["fid"] == pytest.approx(results[0][0]["fid"], rel=1e-6)


class FlagSegmenter:
    """A paper-segmenter-like object: `scores(images, label_size, multiscale)`; the multi-scale
    test shifts every class by one, so the counts show which test a protocol ran."""

    num_classes = K
    name = "flag"

    def scores(self, images, label_size, multiscale=False):
        x = jnp.asarray(images).astype(jnp.int32)
        classes = (x[..., 0] // 64 + 4 * (x[..., 1] // 128) + int(multiscale)) % K
        return jax.nn.one_hot(classes, K, dtype=jnp.float32)


@pytest.fixture(scope="module")
def vivid96(vivid, tmp_path_factory):
    """The vivid run with its scenes rendered at 96x96, so the pipeline resizes them to the
    64x64 output (bicubic images, nearest labels) and the protocols' resizes differ."""
    workdir = str(tmp_path_factory.mktemp("vivid96") / "run")
    shutil.copytree(vivid, workdir, ignore=shutil.ignore_patterns("eval"))
    config = checkpoint.load_config(workdir)
    config.data.synthetic_resolution = 96
    checkpoint.write_config(config, workdir)
    return workdir


# protocol -> (FID reference split, reference count (None: the evaluated 8), PIL resample of the
# reference images, multi-scale segmenter test, cache-name suffix, don't-care pixels in the
# pixel accuracy's denominator)
PROTOCOL_TABLE = {
    "native": ("validation", None, Image.BICUBIC, False, "", False),
    "clade": ("train", 16, Image.BILINEAR, False, "_bilinear", False),
    "spade": ("validation", 64, Image.BICUBIC, True, "", True),
    "oasis": ("validation", 64, Image.BICUBIC, True, "", False),
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_TABLE))
def test_protocol_against_a_hand_computation(vivid96, tmp_path, protocol):
    """Each protocol's FID reference set (split, count, resize), segmenter test (single or
    multi-scale) and pixel accuracy (`spade`: the don't-care pixels count as errors), with the
    labels nearest-downsampled to the output size."""
    split, ref_count, resample, multiscale, suffix, with_dontcare = PROTOCOL_TABLE[protocol]
    config = checkpoint.load_config(vivid96)
    result = evaluate(
        vivid96, protocol=protocol, fid_stats_dir=tmp_path, inception=FEATURES,
        segmenter=FlagSegmenter(),
    )  # fmt: skip
    assert result["protocol"] == protocol and result["num_images"] == 8
    real = scenes(config, "validation", 8)  # labels nearest-downsampled 96 -> 64
    fakes = read_pngs(result, real["name"])
    ref = scenes(config, split, ref_count or 8, resample=resample)
    assert result["fid"] == pytest.approx(features_fid(fakes, ref["image"]), rel=1e-6)
    name = Path(result["fid_real_stats"]).name
    assert name.startswith(f"synthetic_{split}_")
    assert name.endswith(f"{suffix}_n{ref_count or 8}_64x64.npz")
    classes = (colour_classes_np(fakes) + int(multiscale)) % K
    conf = segmentation.confusion_matrix(classes, real["label"], K, DONTCARE)
    np.testing.assert_array_equal(result["confusion"], conf)
    correct = int((classes == real["label"]).sum())  # a don't-care pixel is never "correct"
    dontcare = int((real["label"] == DONTCARE).sum())
    assert dontcare > 0 and correct > 0
    labeled, every = correct / (real["label"].size - dontcare), correct / real["label"].size
    assert result["pixel_accuracy_labeled"] == pytest.approx(labeled, rel=1e-12)
    assert result["pixel_accuracy_all"] == pytest.approx(every, rel=1e-12)
    want = every if with_dontcare else labeled
    assert result["pixel_accuracy"] == pytest.approx(want, rel=1e-12) and every < labeled


class Lowerings:
    """The programs JAX lowers while active, by function name: each jit cache miss (a trace and
    a lowering, then a compilation or a read of the persistent compilation cache) is one."""

    EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __enter__(self):
        self.names = []
        self._listener = lambda event, _, **kw: (
            self.names.append(kw.get("fun_name")) if event == self.EVENT else None
        )
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        from jax._src import monitoring

        monitoring.unregister_event_duration_listener(self._listener)


def test_periodic_evaluation_reuses_its_evaluators_and_the_compiled_program(
    vivid, tmp_path, monkeypatch
):
    """The trainer's periodic evaluation (`loop._evaluate_during_training`) builds the
    evaluators once and hands the same ones to every `evaluate`; checkpoint 1, other weights of
    the same model, is then scored without tracing or compiling anything (the compiled
    evaluation program takes the weights as arguments), and its images and scores are those of
    the new weights (computed independently), not the old ones."""
    from clade_jax.evaluation import evaluate as evaluate_module
    from clade_jax.training import loop

    workdir = str(tmp_path / "run")
    shutil.copytree(vivid, workdir, ignore=shutil.ignore_patterns("eval"))
    config = checkpoint.load_config(workdir)
    init = jax.jit(lambda key: nnx.split(GANState(config, 16, rngs=nnx.Rngs(key)))[1])
    state = init(runtime.init_key(1))  # other weights, the same architecture (and program)
    kernel = state["gen"]["g"]["conv_img"]["kernel"]
    kernel.set_value(kernel[...] * 4.0)
    manager = checkpoint.make_manager(workdir, with_data=False)
    checkpoint.save(manager, 1, state, force=True)
    manager.wait_until_finished()
    manager.close()

    builds, handed = [], []
    real_build, real_evaluate = evaluate_module.build_evaluators, evaluate_module.evaluate
    segmenter = colour_segmenter()

    def build(config, **kwargs):
        builds.append(kwargs)
        return real_build(
            config, inception=FEATURES, segmenter=segmenter, fid_stats_dir=tmp_path / "stats",
            **kwargs,
        )  # fmt: skip

    def evaluate(wd, *, step, evaluators, **kwargs):
        handed.append(evaluators)
        return real_evaluate(wd, step=step, evaluators=evaluators, seed=5, **kwargs)

    monkeypatch.setattr(evaluate_module, "build_evaluators", build)
    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    waiting = type("Manager", (), {"wait_until_finished": lambda self: None})()
    first = loop._evaluate_during_training(waiting, workdir, 0, config)
    with Lowerings() as lowered:
        again = loop._evaluate_during_training(waiting, workdir, 1, config, first)
    print(f"programs lowered by the second evaluation: {len(lowered.names)} {lowered.names}")
    assert again is first and len(builds) == 1 and handed == [first, first]
    assert lowered.names == []  # nothing traced, lowered or compiled: the same program ran

    results = [json.loads(Path(workdir, "eval", f"{s}.json").read_text()) for s in (0, 1)]
    real = scenes(config, "validation", 8)
    fakes = [read_pngs(r, real["name"]) for r in results]
    assert np.abs(fakes[1].astype(int) - fakes[0]).mean() > 10  # other weights, other images
    assert np.abs(fakes[1].astype(int) - generator_images(workdir, real, seed=5)).max() <= 1
    assert results[1]["fid"] == pytest.approx(features_fid(fakes[1], real["image"]), rel=1e-6)
    conf = segmentation.confusion_matrix(colour_classes_np(fakes[1]), real["label"], K, DONTCARE)
    np.testing.assert_array_equal(results[1]["confusion"], conf)
    # Built evaluators already fix the protocol and the networks: a clash is an error naming it.
    with pytest.raises(ValueError, match=r"already fixes \['protocol'\]: pass them to build_"):
        real_evaluate(workdir, step=1, evaluators=first, protocol="spade")


def test_evaluation_prints_progress_lines_off_a_terminal(vivid, tmp_path, caplog):
    """Output that is not a terminal (pytest captures it) gets plain progress lines with the
    counts, the rate and the ETA, for the synthesis pass and for the FID reference statistics
    (`oasis`: the whole validation split in a pass of its own; `native` takes the reference
    features in the synthesis pass, which then is the only one)."""
    import logging

    def progress(**kwargs):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="clade_jax.evaluation"):
            evaluate(
                vivid, max_images=16, batch_size=8, inception=FEATURES, progress_every_s=0.0,
                segmenter=colour_segmenter(), **kwargs,
            )  # fmt: skip
        lines = [r.getMessage() for r in caplog.records if r.name == "clade_jax.evaluation"]
        synthesis = [x for x in lines if x.startswith("evaluation step 0 ")]
        reference = [x for x in lines if x.startswith("FID reference (validation) ")]
        return lines, synthesis, reference

    lines, synthesis, reference = progress(fid_stats_dir=tmp_path / "native")
    assert reference == [], lines
    assert len(synthesis) == 2, lines  # after the first batch, and the closing line
    assert " 8/16 | " in synthesis[0] and "images/s, ETA" in synthesis[0]
    assert " 16/16 | " in synthesis[1] and "images/s" in synthesis[1]
    lines, synthesis, reference = progress(fid_stats_dir=tmp_path / "oasis", protocol="oasis")
    assert len(synthesis) == 2 and len(reference) == 8, lines  # after batches 1-7, the closing
    assert " 8/64 | " in reference[0] and "images/s, ETA" in reference[0]
    assert " 64/64 | " in reference[-1] and "images/s" in reference[-1]


class SubsampleSegmenter:
    """A traced segmenter scoring at the label size from every (H / h, W / w)-th pixel of its
    input (colour classes); records the input sizes it is traced with."""

    num_classes = K
    name = "subsample"

    def __init__(self):
        self.sizes = []

    def scores(self, images, label_size, multiscale=False):
        x = jnp.asarray(images).astype(jnp.int32)
        self.sizes.append(tuple(x.shape[1:3]))
        x = x[:, :: x.shape[1] // label_size[0], :: x.shape[2] // label_size[1]]
        return jax.nn.one_hot(x[..., 0] // 64 + 4 * (x[..., 1] // 128), K, dtype=jnp.float32)


def test_segmenter_size_upsamples_what_the_segmenter_sees(vivid):
    """`segmenter_size=(128, 192)`: the synthesized and the real images reach the segmenter
    resized with PIL bicubic, the labels stay at the 64x64 output size; the counts are the
    hand computation's on PIL's upsampled images."""
    seg = SubsampleSegmenter()
    result = evaluate(vivid, compute_fid=False, segmenter=seg, segmenter_size=(128, 192))
    config = checkpoint.load_config(vivid)
    real = scenes(config, "validation", 8)
    fakes = read_pngs(result, real["name"])
    assert set(seg.sizes) - {(16, 16)} == {(128, 192)}  # (16, 16): the adapter's probe

    def classes(images):
        up = [np.asarray(Image.fromarray(x).resize((192, 128), Image.BICUBIC)) for x in images]
        return colour_classes_np(np.stack(up)[:, ::2, ::3])

    conf = segmentation.confusion_matrix(classes(fakes), real["label"], K, DONTCARE)
    np.testing.assert_array_equal(result["confusion"], conf)
    conf_real = segmentation.confusion_matrix(classes(real["image"]), real["label"], K, DONTCARE)
    want = segmentation.segmentation_metrics(conf_real, DONTCARE)["pixel_accuracy"]
    assert result["real_pixel_accuracy"] == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match=r"segmenter_size must be \(height, width\), got 1024"):
        evaluate(vivid, compute_fid=False, segmenter=seg, segmenter_size=1024)
