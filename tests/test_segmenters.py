"""Parity of the paper segmenters (clade_jax.evaluation.segmenters) with the official PyTorch code.

Fixtures: ../shared/fixtures/segmenters/ (README.txt there): the official UperNet101 (mit-semseg),
DeepLabV2-MSC (kazuto1011) and DRN-D-105 (fyu/drn) at reduced size with random weights, run
through each official test-time protocol on one 75 x 101 image; and the full-size state-dict
manifests (names, shapes, no weights).

Shown here:
* every recorded intermediate (`inter/*`, DeepLab's `inter_scale<p>/*` too) and both protocols'
  scores within 1e-4 relative (max |diff| / max |ref|), predictions equal on >= 99.9% of pixels,
  the number of compared keys equal to what the fixture holds;
* the host-side steps on their own: PIL image resizes and preprocessing, label mappings, the
  official metrics from our confusion matrices;
* full-size parameter counts (nnx.eval_shape) and the converter's name / shape map against the
  full manifests, without allocating weights;
* bad input: a state of another network, a wrong class count, unknown / missing names, wrong
  shapes, missing files (named, with where they are published), bad images;
* `segmenters.load` on `.pth` files written here (torch's zip layout, no torch) round-trips.
The three tiny networks are built and run once per module (module-scoped fixtures).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from clade_jax.evaluation import segmenters
from clade_jax.evaluation.segmenters import convert, deeplab, drn, labels, resize, upernet

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "segmenters"
TINY = {
    "upernet101": "upernet101_ade20k_tiny",
    "deeplabv2": "deeplabv2_cocostuff_tiny",
    "drn_d_105": "drn_d_105_cityscapes_tiny",
}
MANIFEST = {
    "upernet101": "upernet101_ade20k_full_manifest",
    "deeplabv2": "deeplabv2_cocostuff_full_manifest",
    "drn_d_105": "drn_d_105_cityscapes_full_manifest",
}
# The numbers (each manifest's torch parameters(); BN running stats are buffers).
FULL_PARAMS = {"upernet101": 83_214_422, "deeplabv2": 55_919_384, "drn_d_105": 54_302_915}
DATASET = {"upernet101": "ade20k", "deeplabv2": "cocostuff", "drn_d_105": "cityscapes"}
RTOL = 1e-4
PRED_AGREEMENT = 0.999


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def nchw(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


class Tiny:
    """One tiny fixture, its segmenter, and everything computed from it once."""

    def __init__(self, name: str):
        path = FIXTURES / f"{TINY[name]}.npz"
        if not path.exists():
            pytest.skip(f"segmenter fixture {path} missing (needs ../shared)")
        self.name = name
        self.data = np.load(path)
        self.meta = json.loads(str(self.data["meta/json"]))
        self.config = self.meta["config"]
        self.state = {k: self.data[k] for k in self.data.files if "/" not in k}
        self.seg = segmenters.from_official(name, self.state, **self.config)
        self.image = self.data["input/image"][None]  # (1, H, W, 3) uint8
        self.label_size = self.image.shape[1:3]
        x = self.data["input/img_data/300" if name == "upernet101" else "input/img_data"]
        if name == "deeplabv2":
            self.taps = self.seg.msc_features(nhwc(x))
        else:
            self.taps = self.seg.features(nhwc(x))
        self.scores = {
            v: np.asarray(self.seg.scores(self.image, self.label_size, multiscale=ms))
            for v, ms in (("single_scale", False), ("multi_scale", True))
        }

    def __getitem__(self, key):
        return self.data[key]


@pytest.fixture(scope="module")
def tiny():
    cache: dict[str, Tiny] = {}

    def get(name: str) -> Tiny:
        if name not in cache:
            cache[name] = Tiny(name)
        return cache[name]

    return get


NAMES = list(TINY)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", NAMES)
def test_every_intermediate_matches(tiny, name):
    t = tiny(name)
    keys = [k for k in t.data.files if k.startswith("inter")]
    hooked = t.meta["hooked_modules"]
    # DeepLab records the base forward three times: on x and inside MSC at each scale.
    per_forward = 1 + (len(deeplab.MSC_SCALES) if name == "deeplabv2" else 0)
    assert len(keys) == len(hooked) * per_forward  # the fixture holds what its meta says
    compared = 0
    for key in keys:
        prefix, module = key.split("/", 1)
        ours = module if prefix == "inter" else f"scale{prefix[len('inter_scale') :]}/{module}"
        err = rel_err(nchw(t.taps[ours]), t[key])
        assert err <= RTOL, f"{key}: relative error {err:.2e}"
        compared += 1
    assert compared == len(keys) and compared >= 11


@pytest.mark.parametrize("variant", ["single_scale", "multi_scale"])
@pytest.mark.parametrize("name", NAMES)
def test_scores_and_predictions_match(tiny, name, variant):
    t = tiny(name)
    ref = t[f"output/{variant}/scores"]
    ours = t.scores[variant]
    n, h, w = t.image.shape[:3]
    assert ours.shape == (n, h, w, t.seg.num_classes) and ours.dtype == np.float32
    err = rel_err(nchw(ours), ref)
    assert err <= RTOL, f"{variant} scores: relative error {err:.2e}"
    pred = np.asarray(labels.predictions(ours))[0]
    assert (pred == t[f"output/{variant}/pred"]).mean() >= PRED_AGREEMENT
    assert len(np.unique(pred)) > 2  # the fixture's predictions are not flat


def test_upernet_per_scale_probabilities(tiny):
    t = tiny("upernet101")
    h, w = t.label_size
    keys = [k for k in t.data.files if k.startswith("output/per_scale/")]
    assert len(keys) == len(upernet.IMG_SIZES) - 1
    for key in keys:
        s = int(key.split("/")[2])
        resized = t[f"input/img_resized_u8/{s}"][None]
        assert resized.shape[1:3] == upernet.scaled_size(h, w, s)
        for fn in (resize.pil_resize_uint8, resize.pil_resize_uint8_device):  # host PIL, device
            assert np.array_equal(fn(t.image, resized.shape[1:3], "bilinear"), resized)
        err = rel_err(nchw(t.seg.scale_probs(resized, (h, w))), t[key])
        assert err <= RTOL, f"{key}: {err:.2e}"


def test_deeplab_msc_inputs_and_logits(tiny):
    t = tiny("deeplabv2")
    assert np.array_equal(deeplab.preprocess(t.image), nhwc(t["input/img_data"]))
    assert np.array_equal(deeplab.preprocess_device(t.image), nhwc(t["input/img_data"]))
    for p in deeplab.MSC_SCALES:
        err = rel_err(nchw(t.taps[f"input_scale{p}"]), t[f"input/msc_scaled/{p}"])
        assert err <= 1e-6, f"scale_factor={p} interpolation: {err:.2e}"
    # logits before the label-size resize, and the MSC max over scales
    x = nhwc(t["input/img_data"])
    assert rel_err(nchw(t.seg.forward(x)), t["output/single_scale/logits"]) <= RTOL
    assert rel_err(nchw(t.seg.msc_logits(x)), t["output/multi_scale/logits"]) <= RTOL


def test_drn_raw_outputs_and_multiscale_inputs(tiny):
    t = tiny("drn_d_105")
    assert rel_err(drn.normalize(t.image), nhwc(t["input/img_data"])) <= 1e-6
    log_probs, seg_logits = t.seg.forward(nhwc(t["input/img_data"]))
    # test()'s unresized 8*ceil(H/8) map, then the resize_4d_tensor step alone
    assert rel_err(nchw(log_probs), t["output/single_scale/log_probs_raw"]) <= RTOL
    assert rel_err(nchw(seg_logits), t["output/single_scale/seg_logits"]) <= RTOL
    assert np.array_equal(np.argmax(log_probs, -1)[0], t["output/single_scale/pred_raw"])
    h, w = t.label_size
    for s in drn.MS_SCALES:
        u8 = t[f"input/ms_u8/{s}"][None]
        for fn in (resize.pil_resize_uint8, resize.pil_resize_uint8_device):  # host PIL, device
            assert np.array_equal(fn(t.image, (int(h * s), int(w * s)), "bicubic"), u8)
    # one scale's 1/8 logits (one more compile; the scores test covers every scale's fusion)
    _, logits = t.seg.forward(drn.normalize(t["input/ms_u8/1.75"][None]))
    assert rel_err(nchw(logits), t["output/multi_scale/seg_logits/1.75"]) <= RTOL


def test_pil_float_resize_matches_pil():
    """resize_4d_tensor's PIL BILINEAR on float32 maps, shrinking and enlarging, on the device."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(80, 104, 75, 101), (10, 13, 75, 101), (64, 64, 64, 40)]:
        x = rng.normal(size=(h, w)).astype(np.float32)
        want = np.asarray(Image.fromarray(x).resize((ow, oh), Image.BILINEAR))
        got = np.asarray(resize.pil_resize_float(x[None, :, :, None], (oh, ow)))[0, :, :, 0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("filter", ["bilinear", "bicubic"])
def test_device_uint8_resize_is_bit_exact_pil(filter):
    """PIL's fixed-point 8-bit resampling in JAX: shrinking, enlarging, one axis only (sizes
    where Pillow runs the horizontal pass first; see the caveat in resize.py)."""
    x = np.random.default_rng(1).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    for size in [(11, 17), (100, 64), (37, 20), (80, 53), (60, 160)]:
        want = resize.pil_resize_uint8(x, size, filter)
        assert np.array_equal(resize.pil_resize_uint8_device(x, size, filter), want), size


def test_scores_fn_composes_into_a_compiled_step(tiny):
    """The protocol as a pure function inside an evaluator's own jit: same scores, on device."""
    t = tiny("deeplabv2")
    fn = t.seg.scores_fn(t.label_size, multiscale=False)
    step = jax.jit(lambda state, images: labels.predictions(fn(state, images)))
    pred = np.asarray(step(t.seg.state, t.image))[0]
    assert np.array_equal(pred, np.argmax(t.scores["single_scale"][0], -1))
    assert (pred == t["output/single_scale/pred"]).mean() >= PRED_AGREEMENT
    # UperNet's whole 5-scale protocol, PIL resizes included, inside one compiled function
    u = tiny("upernet101")
    fn = jax.jit(u.seg.scores_fn(u.label_size, multiscale=True))
    assert rel_err(nchw(fn(u.seg.state, u.image)), u["output/multi_scale/scores"]) <= RTOL


def test_bilinear_matches_torch_align_corners_rules():
    """interpolate_bilinear against torch's formulas written out by hand on a 1-D ramp."""
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1) ** 2  # 0, 1, 4, 9 along W
    # align_corners=False, 4 -> 8: src = (d + 0.5) / 2 - 0.5, clamped at 0
    src = np.maximum((np.arange(8) + 0.5) / 2 - 0.5, 0)
    want = np.interp(src, np.arange(4), x[0, 0, :, 0])
    got = resize.interpolate_bilinear(x, (1, 8))[0, 0, :, 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # align_corners=True, 4 -> 7: src = d * 3 / 6
    want = np.interp(np.arange(7) * 0.5, np.arange(4), x[0, 0, :, 0])
    got = resize.interpolate_bilinear(x, (1, 7), align_corners=True)[0, 0, :, 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # scale_factor 0.75 on 5 -> floor(3.75) = 3 samples at (d + 0.5) / 0.75 - 0.5 (not 5/3)
    y = np.broadcast_to(np.arange(5, dtype=np.float32).reshape(1, 1, 5, 1), (1, 4, 5, 1))
    got = resize.interpolate_bilinear(y, scale_factor=0.75)[0, 0, :, 0]
    np.testing.assert_allclose(got, (np.arange(3) + 0.5) / 0.75 - 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------- labels, metrics


def test_label_mappings(tiny):
    up, dl, dr = tiny("upernet101"), tiny("deeplabv2"), tiny("drn_d_105")
    assert np.array_equal(labels.labels_for("ade20k", up["input/label_png"]), up["input/label"])
    coco = labels.labels_for("cocostuff", dl["input/label"])
    assert np.array_equal(coco, np.where(dl["input/label"] == 255, -1, dl["input/label"]))
    city = labels.labels_for("cityscapes", dr["input/label_ids"])
    assert np.array_equal(np.where(city < 0, 255, city), dr["input/label"])
    table = dr["input/labelid_to_trainid"]
    assert np.array_equal(labels.CITYSCAPES_LABELID_TO_TRAINID, np.where(table == 255, -1, table))
    assert labels.labels_for("cityscapes", np.array([-1, 7, 33]))[0] == -1


@pytest.mark.parametrize(
    "dataset, raw, bad",
    [("ade20k", [0, 151], 151), ("cocostuff", [3, 200], 200), ("cityscapes", [7, 34], 34)],
)
def test_label_outside_the_classes_is_named(dataset, raw, bad):
    with pytest.raises(ValueError, match=rf"{dataset}.*\[{bad}\]"):
        labels.labels_for(dataset, np.array(raw))


def test_official_metrics_from_confusion(tiny):
    dr = tiny("drn_d_105")
    for v in ("single_scale", "multi_scale"):
        lab = labels.labels_for("cityscapes", dr["input/label_ids"])
        hist = np.asarray(labels.confusion_matrix(dr[f"output/{v}/pred"], lab, 19))
        assert np.array_equal(hist, dr[f"output/{v}/metric/hist"])
        iou = labels.scores_from_confusion(hist, "drn")["class_iou"] * 100
        np.testing.assert_allclose(iou, dr[f"output/{v}/metric/class_iou_percent"], rtol=1e-6)
    up = tiny("upernet101")
    hist = np.asarray(labels.confusion_matrix(up["output/multi_scale/pred"], up["input/label"], 8))
    np.testing.assert_array_equal(np.diag(hist), up["output/multi_scale/metric/area_intersection"])
    union = hist.sum(0) + hist.sum(1) - np.diag(hist)
    np.testing.assert_array_equal(union, up["output/multi_scale/metric/area_union"])
    acc = labels.scores_from_confusion(hist, "mit")["pixel_acc"]
    np.testing.assert_allclose(acc, up["output/multi_scale/metric/pixel_acc"], rtol=1e-6)
    dl = tiny("deeplabv2")
    lab = labels.labels_for("cocostuff", dl["input/label"])
    hist = labels.confusion_matrix(dl["output/multi_scale/pred"], lab, 16)
    got = labels.scores_from_confusion(hist, "deeplab")
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        np.testing.assert_allclose(got[key], dl[f"output/multi_scale/metric/{key}"], rtol=1e-6)


# ----------------------------------------------------------------------------- full size


def _manifest(name: str) -> dict[str, tuple]:
    path = FIXTURES / f"{MANIFEST[name]}.npz"
    if not path.exists():
        pytest.skip(f"segmenter manifest {path} missing (needs ../shared)")
    d = np.load(path)
    shapes = {
        str(n): tuple(int(s) for s in shape[:ndim])
        for n, shape, ndim in zip(
            d["manifest/name"], d["manifest/shape"], d["manifest/ndim"], strict=True
        )
    }
    params = int(d["manifest/numel"][d["manifest/is_parameter"] == 1].sum())
    return {"shapes": shapes, "params": params}


@pytest.mark.parametrize("name", NAMES)
def test_full_size_parameter_count(name):
    man = _manifest(name)
    assert man["params"] == FULL_PARAMS[name]
    assert segmenters.parameter_count(name) == FULL_PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_converter_maps_every_full_size_name_and_shape(name):
    shapes = _manifest(name)["shapes"]
    net = segmenters.abstract(name)  # nnx.eval_shape: nothing allocated
    entries = convert.entries(net)
    assert list(entries) == list(shapes)  # every name, in the official order
    assert {k: e.torch_shape for k, e in entries.items()} == shapes
    fake = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}
    loadable = convert.check_state(net, fake, network=name)
    # the buffers the eval forward never reads are accepted but not loaded
    skipped = {
        k
        for k in shapes
        if k.endswith(
            ("num_batches_tracked", "_tmp_running_mean", "_tmp_running_var", "_running_iter")
        )
    }
    assert set(loadable) == set(shapes) - skipped and skipped
    # one unknown, one missing, one wrong shape: all three reported in one error
    bad = dict(fake)
    first, second, third = list(entries)[:3]
    del bad[first]
    bad[second] = jax.ShapeDtypeStruct((1, 2, 3), np.float32)
    bad["decoder.extra.weight" if name == "upernet101" else "base.extra.weight"] = fake[third]
    with pytest.raises(convert.WeightsError) as err:
        convert.check_state(net, bad, network=name, source="bad.pth")
    msg = str(err.value)
    assert "bad.pth" in msg and f"missing names: {first}" in msg and "extra.weight" in msg
    assert f"{second}: shape (1, 2, 3)" in msg


# ----------------------------------------------------------------------------- bad input


def test_state_of_another_network_is_named(tiny):
    drn_state = tiny("drn_d_105").state
    with pytest.raises(segmenters.WeightsError, match="looks like a drn_d_105 state"):
        segmenters.from_official("upernet101", drn_state, **tiny("upernet101").config)
    with pytest.raises(segmenters.WeightsError, match="looks like a upernet101"):
        segmenters.from_official("deeplabv2", tiny("upernet101").state)


def test_wrong_class_count_is_named(tiny):
    t = tiny("upernet101")
    config = {**t.config, "num_class": 9}
    with pytest.raises(segmenters.WeightsError, match="state has 8 classes.*num_class=9"):
        segmenters.from_official("upernet101", t.state, **config)
    d = tiny("drn_d_105")
    with pytest.raises(segmenters.WeightsError, match="state has 19 classes.*classes=21"):
        segmenters.from_official("drn_d_105", d.state, **{**d.config, "classes": 21})


def test_bad_arguments_are_named(tiny):
    with pytest.raises(ValueError, match="unknown segmenter 'pspnet'"):
        segmenters.from_official("pspnet", None)
    with pytest.raises(TypeError, match="unknown architecture argument.*'depth'"):
        segmenters.from_official("drn_d_105", None, depth=105)
    seg = tiny("drn_d_105").seg
    with pytest.raises(ValueError, match=r"uint8 RGB \(N, H, W, 3\), got float32"):
        seg.scores(np.zeros((1, 8, 8, 3), np.float32), (8, 8))


# ----------------------------------------------------------------------------- .pth files


def _write_pth(path: Path, state: dict[str, np.ndarray]) -> None:
    """A `torch.save(state_dict)` zip file written opcode by opcode (no torch)."""
    storages = {"float32": "FloatStorage", "int64": "LongStorage"}
    b = bytearray(b"\x80\x02")

    def glob(module, name):
        b.extend(f"c{module}\n{name}\n".encode())

    def text(s):
        enc = s.encode()
        b.extend(b"X" + struct.pack("<I", len(enc)) + enc)

    def ints(values):
        b.extend(b"(")
        for v in values:
            b.extend(b"J" + struct.pack("<i", v))
        b.extend(b"t")

    def ordered_dict():
        glob("collections", "OrderedDict")
        b.extend(b")R")

    members = {}
    ordered_dict()
    b.extend(b"(")
    for i, (name, array) in enumerate(state.items()):
        array = np.array(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        members[f"archive/data/{i}"] = array.tobytes()
        text(name)
        glob("torch._utils", "_rebuild_tensor_v2")
        b.extend(b"(")
        b.extend(b"(")  # persistent id tuple
        text("storage")
        glob("torch", storages[str(array.dtype)])
        text(str(i))
        text("cpu")
        b.extend(b"J" + struct.pack("<i", array.size))
        b.extend(b"tQ")  # TUPLE, BINPERSID
        b.extend(b"J" + struct.pack("<i", 0))
        ints(array.shape)
        ints([int(np.prod(array.shape[j + 1 :])) for j in range(array.ndim)])
        b.extend(b"\x89")
        ordered_dict()
        b.extend(b"tR")
    b.extend(b"u.")  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", bytes(b))
        zf.writestr("archive/byteorder", "little")
        for member, raw in members.items():
            zf.writestr(member, raw)
        zf.writestr("archive/version", "3\n")


def _same_variables(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(nnx.state(a)), jax.tree_util.tree_leaves(nnx.state(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_load_published_files_round_trip(tiny, tmp_path):
    d = tiny("drn_d_105")
    _write_pth(tmp_path / "drn-d-105_ms_cityscapes.pth", d.state)
    seg = segmenters.load("drn_d_105", tmp_path / "drn-d-105_ms_cityscapes.pth", **d.config)
    assert _same_variables(seg.net, d.seg.net)
    # DataParallel's "module." prefix is removed; a folder finds the published file name
    _write_pth(
        tmp_path / "drn-d-105_ms_cityscapes.pth", {f"module.{k}": v for k, v in d.state.items()}
    )
    assert _same_variables(segmenters.load("drn_d_105", tmp_path, **d.config).net, d.seg.net)

    u = tiny("upernet101")
    folder = tmp_path / "ade20k-resnet101-upernet"
    folder.mkdir()
    for part in ("encoder", "decoder"):
        sub = {k[len(part) + 1 :]: v for k, v in u.state.items() if k.startswith(part + ".")}
        _write_pth(folder / f"{part}_epoch_50.pth", sub)
    assert _same_variables(segmenters.load("upernet101", folder, **u.config).net, u.seg.net)
    # the two paths in either order
    pair = [folder / "decoder_epoch_50.pth", folder / "encoder_epoch_50.pth"]
    assert _same_variables(segmenters.load("upernet101", pair, **u.config).net, u.seg.net)
    # a file given to the wrong network
    with pytest.raises(segmenters.WeightsError, match="looks like a drn_d_105"):
        segmenters.load("deeplabv2", tmp_path / "drn-d-105_ms_cityscapes.pth")


def test_missing_weights_name_the_file_and_where_published(tmp_path):
    with pytest.raises(segmenters.WeightsError, match=r"nope\.pth does not exist.*dl\.yf\.io"):
        segmenters.load("drn_d_105", tmp_path / "nope.pth")
    with pytest.raises(
        segmenters.WeightsError,
        match=r"deeplabv2_resnet101_msc-cocostuff164k-100000\.pth does not exist.*kazuto1011",
    ):
        segmenters.load("deeplabv2", tmp_path)
    (tmp_path / "encoder_epoch_50.pth").write_bytes(b"")
    with pytest.raises(
        segmenters.WeightsError, match=r"decoder_epoch_50\.pth does not exist.*sceneparsing"
    ):
        segmenters.load("upernet101", tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(segmenters.WeightsError, match=r"junk\.pth"):
        segmenters.load("drn_d_105", tmp_path / "junk.pth")
