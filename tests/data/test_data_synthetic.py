"""Synthetic scenes: deterministic per index, fast, any size, and each class looks like itself."""

from __future__ import annotations

import time

import numpy as np
import pytest

from clade_jax.data import synthetic as S


def _scenes(n=40, size=64, split="train"):
    return [S.generate_scene(i, size, size, split=split) for i in range(n)]


def test_deterministic_per_index_and_distinct_across_indices_and_splits():
    a, b = S.generate_scene(7, 48, 64), S.generate_scene(7, 48, 64)
    for k in ("image", "label", "instance"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(S.generate_scene(8, 48, 64)["image"], a["image"])
    assert not np.array_equal(S.generate_scene(7, 48, 64, split="validation")["image"], a["image"])
    assert not np.array_equal(S.generate_scene(7, 48, 64, seed=1)["image"], a["image"])


@pytest.mark.parametrize("h,w", [(8, 8), (17, 33), (64, 64), (128, 256)])
def test_any_resolution_shapes_and_ranges(h, w):
    s = S.generate_scene(3, h, w)
    assert s["image"].shape == (h, w, 3) and s["image"].dtype == np.uint8
    assert s["label"].shape == (h, w) and s["label"].dtype == np.int32
    assert s["instance"].shape == (h, w) and s["instance"].dtype == np.int32
    assert 0 <= s["label"].min() and s["label"].max() < S.NUM_CLASSES


def test_fast_enough_for_the_demo():
    S.generate_scene(0, 64, 64)
    start = time.perf_counter()
    for i in range(100):
        S.generate_scene(i, 64, 64)
    per_scene = (time.perf_counter() - start) / 100
    assert per_scene < 0.01, f"{per_scene * 1e3:.2f} ms per 64x64 scene"  # measured ~1.3 ms


def test_every_class_appears_and_has_its_own_colour():
    scenes = _scenes()
    labels = np.stack([s["label"] for s in scenes])
    images = np.stack([s["image"] for s in scenes]).astype(np.float64)
    assert set(np.unique(labels)) == set(range(S.NUM_CLASSES))
    means = {}
    for c in range(S.NUM_CLASSES - 1):  # the don't-care class is random colours
        pixels = images[labels == c]
        means[c] = pixels.mean(0)
        # Buildings' mean includes their dark windows; every other class sits on its palette entry.
        tol = 45 if c == S.BUILDING else 15
        assert np.abs(means[c] - S.PALETTE[c]).max() < tol, (S.CLASS_NAMES[c], means[c])
    for a in means:
        for b in means:
            if a < b:
                assert np.linalg.norm(means[a] - means[b]) > 30, (
                    S.CLASS_NAMES[a],
                    S.CLASS_NAMES[b],
                )
    dontcare = images[labels == S.DONTCARE]
    assert dontcare.std(0).min() > 50  # unpredictable: nothing to learn there


def test_textures_sky_gradient_water_waves_building_windows():
    sky_top, sky_low, water_rows, water_cols, building = [], [], [], [], []
    for s in _scenes(60, 96):
        lab, img = s["label"], s["image"].astype(np.float64)
        rows = np.nonzero((lab == S.SKY).all(1))[0]
        if len(rows) >= 10:  # sky gets paler towards the horizon
            sky_top.append(img[rows[:3]].mean((0, 1)))
            sky_low.append(img[rows[-3:]].mean((0, 1)))
        block = img[..., 2][(lab == S.WATER)]
        if block.size > 500:
            r, c = np.nonzero(lab == S.WATER)
            water = np.zeros_like(lab, float)
            water[r, c] = img[r, c, 2]
            full_rows = np.nonzero((lab == S.WATER).all(1))[0]
            if len(full_rows) > 12:  # waves: brightness varies along columns, not along rows
                patch = water[full_rows]
                water_rows.append(patch.mean(1).std())
                water_cols.append(patch.std(1).mean())
        building.append(img[lab == S.BUILDING])
    assert len(sky_top) > 10 and np.mean(sky_top, 0)[0] + 40 < np.mean(sky_low, 0)[0]
    assert len(water_rows) > 3 and np.mean(water_rows) > 2 * np.mean(water_cols)
    wall_or_window = np.concatenate(building)
    dark = wall_or_window.mean(1) < 80
    assert 0.1 < dark.mean() < 0.5  # a grid of windows on every wall


def test_instances_are_objects_of_their_class():
    for s in _scenes(30):
        lab, inst = s["label"], s["instance"]
        objects = inst >= 1000
        np.testing.assert_array_equal(inst[objects] // 1000, lab[objects])
        np.testing.assert_array_equal(inst[~objects], lab[~objects])
        assert set(np.unique(lab[objects])) <= {S.CLOUD, S.BUILDING, S.TREE}
    counts = [len(np.unique(s["instance"][s["label"] == S.TREE])) for s in _scenes(30)]
    assert max(counts) >= 2  # distinct ids for distinct trees


def test_source_names_and_optional_instances():
    src = S.SyntheticSource(5, 24, 32, split="validation", use_instance=False)
    assert len(src) == 5
    ex = src[4]
    assert ex["name"] == "synthetic_validation_0000004" and "instance" not in ex
    np.testing.assert_array_equal(
        ex["label"], S.generate_scene(4, 24, 32, split="validation")["label"]
    )
    with pytest.raises(IndexError):
        src[5]


def test_without_dontcare_no_pixel_is_dontcare():
    for i in range(30):
        assert not np.any(S.generate_scene(i, 32, 32, with_dontcare=False)["label"] == S.DONTCARE)
