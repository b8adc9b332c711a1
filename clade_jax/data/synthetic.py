"""Procedural "synthetic scenes": label maps with matching photos, instance maps, and a palette.

This is the demo's and the tests' data set. Every scene is an outdoor landscape drawn with NumPy:
a sky with a vertical gradient and clouds, optional mountains, horizontal ground bands (water with
horizontal waves, sand, grass, road) below a horizon line, buildings with window grids, blobby
trees, and sometimes a patch of the don't-care class filled with random colours. Each class has one
clear appearance (its colour statistics and texture), so that a small GAN can learn the
class -> appearance mapping on a CPU in minutes.

Why it exists: the real data sets are tens of GB and cannot be downloaded here; a generator that is
deterministic per index gives the pipeline, the trainer and the evaluation something realistic
enough to exercise everything (don't-care pixels, instance maps, ICPE maps) at any resolution.

* `generate_scene(index, height, width)` -> {'image', 'label', 'instance'}; deterministic per
  (seed, split, index); about 1 ms at 64x64.
* `SyntheticSource`: a grain random-access source of such scenes.
* `NUM_CLASSES`, `CLASS_NAMES`, `DONTCARE`, `PALETTE` (`clade_jax.visualize.colorize` uses it).

Instance ids follow the Cityscapes convention: stuff pixels carry their class id (< 1000), object
instances (clouds, buildings, trees) carry `class_id * 1000 + k` with k >= 1.
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES = (
    "sky",
    "cloud",
    "mountain",
    "water",
    "sand",
    "grass",
    "road",
    "building",
    "tree",
    "unknown",  # the don't-care class: random colours, nothing to learn
)
NUM_CLASSES = len(CLASS_NAMES)  # counts the don't-care class, as everywhere in clade_jax
SKY, CLOUD, MOUNTAIN, WATER, SAND, GRASS, ROAD, BUILDING, TREE, DONTCARE = range(NUM_CLASSES)

# The mean colour of each class's texture; used as the palette, so a colourised label map looks
# like a flat version of the photo. The don't-care class is shown black.
PALETTE = np.array(
    [
        [122, 168, 228],  # sky (mean of its gradient)
        [238, 240, 246],  # cloud
        [112, 102, 126],  # mountain
        [40, 95, 165],  # water
        [215, 195, 145],  # sand
        [70, 145, 55],  # grass
        [85, 85, 90],  # road
        [165, 100, 80],  # building (wall colour; windows are darker)
        [35, 95, 40],  # tree
        [0, 0, 0],  # unknown / don't-care
    ],
    dtype=np.uint8,
)

_WINDOW_COLOR = np.array([45, 55, 85], np.float32)
_SKY_TOP = np.array([70, 130, 215], np.float32)
_SKY_HORIZON = np.array([175, 205, 240], np.float32)
# Plausible orders of the ground bands below the horizon (far to near).
_GROUND_TEMPLATES = (
    (GRASS,),
    (WATER, SAND),
    (WATER, SAND, GRASS),
    (GRASS, ROAD, GRASS),
    (SAND, WATER),
    (GRASS, ROAD),
    (WATER,),
    (SAND, ROAD, GRASS),
)
_SPLIT_IDS = {"train": 0, "validation": 1}


def generate_scene(
    index: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    split: str = "train",
    with_dontcare: bool = True,
) -> dict[str, np.ndarray]:
    """Draws scene number `index`; the same arguments always give the same arrays.

    Args:
      index: scene number (any non-negative int).
      height, width: output size in pixels (any size >= 8; the layout scales with it).
      seed: selects a different family of scenes.
      split: 'train' or 'validation'; the two splits never share a scene.
      with_dontcare: whether don't-care patches may appear (the class id exists either way).

    Returns:
      dict with 'image' (H, W, 3) uint8, 'label' (H, W) int32 in [0, NUM_CLASSES) and
      'instance' (H, W) int32.
    """
    if height < 8 or width < 8:
        raise ValueError(f"synthetic scenes need at least 8x8 pixels, got {height}x{width}")
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]))
    label, instance, geometry = _layout(rng, height, width, with_dontcare)
    image = _render(rng, label, instance, geometry)
    return {"image": image, "label": label, "instance": instance}


# ---------------------------------------------------------------------------------------------
# Layout: which class is where.


def _layout(rng: np.random.Generator, h: int, w: int, with_dontcare: bool):
    rows = np.arange(h, dtype=np.float32)[:, None]  # (H, 1)
    cols = np.arange(w, dtype=np.float32)[None, :]  # (1, W)
    label = np.full((h, w), SKY, np.int32)
    instance = np.full((h, w), SKY, np.int32)
    horizon = int(rng.uniform(0.35, 0.6) * h)
    geometry = {"horizon": horizon, "mountain_top": horizon, "wall_gain": {}, "boxes": {}}

    def paint(mask: np.ndarray, cls: int, inst: int | None = None) -> None:
        label[mask] = cls
        instance[mask] = cls if inst is None else inst

    # Clouds: flat ellipses in the upper sky.
    for k in range(1, int(rng.integers(0, 4)) + 1):
        cy, cx = rng.uniform(0.05, 0.6) * horizon, rng.uniform(0, w)
        ry, rx = rng.uniform(0.03, 0.07) * h, rng.uniform(0.08, 0.2) * w
        paint(((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0, CLOUD, CLOUD * 1000 + k)

    # Mountains: a ridge made of one to three tent-shaped peaks standing on the horizon.
    if rng.random() < 0.6:
        ridge = np.zeros((1, w), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            peak_x, half_width = rng.uniform(0, w), rng.uniform(0.15, 0.45) * w
            peak_h = rng.uniform(0.15, 0.45) * h
            ridge = np.maximum(
                ridge, peak_h * np.clip(1 - np.abs(cols - peak_x) / half_width, 0, 1)
            )
        paint((rows >= horizon - ridge) & (rows < horizon), MOUNTAIN)
        geometry["mountain_top"] = int(horizon - ridge.max())

    # Ground: horizontal bands with gently wavy boundaries.
    bands = _GROUND_TEMPLATES[int(rng.integers(len(_GROUND_TEMPLATES)))]
    cuts = np.sort(rng.uniform(0.25, 0.8, len(bands) - 1))
    top = np.full((1, w), float(horizon), np.float32)
    for i, cls in enumerate(bands):
        if i + 1 < len(bands):
            level = horizon + cuts[i] * (h - horizon)
            amp, period = rng.uniform(0, 0.03) * h, rng.uniform(0.5, 1.5) * w
            bottom = level + amp * np.sin(2 * np.pi * cols / period + rng.uniform(0, 2 * np.pi))
        else:
            bottom = np.full((1, w), float(h), np.float32)
        paint((rows >= top) & (rows < bottom), cls)
        top = bottom

    # Buildings stand on the horizon (not on water).
    if bands[0] != WATER:
        for k in range(1, int(rng.integers(0, 4)) + 1):
            bw, bh = rng.uniform(0.08, 0.22) * w, rng.uniform(0.15, 0.4) * h
            x0 = rng.uniform(-0.05, 0.95) * w
            y1 = horizon + rng.uniform(0.0, 0.05) * h
            box = (int(y1 - bh), int(x0), int(y1), int(x0 + bw))
            mask = (rows >= box[0]) & (rows < box[2]) & (cols >= box[1]) & (cols < box[3])
            inst = BUILDING * 1000 + k
            paint(mask, BUILDING, inst)
            geometry["boxes"][inst] = box
            geometry["wall_gain"][inst] = rng.uniform(0.9, 1.1)

    # Trees: round canopies on land (drawn after buildings, so they occlude them).
    for k in range(1, int(rng.integers(0, 5)) + 1):
        cy = horizon + rng.uniform(-0.08, 0.25) * (h - horizon)
        cx = rng.uniform(0, w)
        ry, rx = rng.uniform(0.06, 0.14) * h, rng.uniform(0.04, 0.09) * w
        foot = label[min(int(cy + ry), h - 1), min(int(cx), w - 1)]
        if foot == WATER:
            continue
        paint(((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0, TREE, TREE * 1000 + k)

    # Don't-care: a small rectangle of "unknown" pixels (as unannotated regions in ADE20k/COCO).
    if with_dontcare and rng.random() < 0.3:
        dh, dw = int(rng.uniform(0.05, 0.15) * h) + 1, int(rng.uniform(0.05, 0.15) * w) + 1
        y0, x0 = int(rng.integers(0, h - dh + 1)), int(rng.integers(0, w - dw + 1))
        label[y0 : y0 + dh, x0 : x0 + dw] = DONTCARE
        instance[y0 : y0 + dh, x0 : x0 + dw] = DONTCARE
    return label, instance, geometry


# ---------------------------------------------------------------------------------------------
# Rendering: each class's texture, evaluated only at that class's pixels.


def _render(
    rng: np.random.Generator, label: np.ndarray, instance: np.ndarray, geometry
) -> np.ndarray:
    h, w = label.shape
    image = np.zeros((h, w, 3), np.float32)
    noise = rng.standard_normal((h, w)).astype(np.float32)  # shared per-pixel noise field
    horizon = max(geometry["horizon"], 1)
    for cls in np.unique(label):
        r, c = np.nonzero(label == cls)
        n = noise[r, c][:, None]  # (P, 1)
        rf, cf = r.astype(np.float32)[:, None], c.astype(np.float32)[:, None]
        if cls == SKY:  # vertical gradient from deep blue to pale blue at the horizon
            t = np.clip(rf / horizon, 0, 1)
            col = _SKY_TOP * (1 - t) + _SKY_HORIZON * t + 2 * n
        elif cls == CLOUD:
            col = PALETTE[CLOUD] + 4 * n
        elif cls == MOUNTAIN:  # lighter at the peaks, darker at the foot
            top = geometry["mountain_top"]
            t = np.clip((rf - top) / max(horizon - top, 1), 0, 1)
            col = PALETTE[MOUNTAIN] * (1.15 - 0.3 * t) + 5 * n
        elif cls == WATER:  # horizontal waves: stripes along rows, slightly bent across columns
            period = max(3.0, h / 12)
            phase = 2 * np.pi * rf / period + 0.35 * np.sin(2 * np.pi * cf / max(w / 3, 1))
            col = PALETTE[WATER] + 28 * np.sin(phase) * np.array([0.6, 0.8, 1.0]) + 3 * n
        elif cls == SAND:  # fine grey speckle
            col = PALETTE[SAND] + 12 * n
        elif cls == GRASS:  # green-dominant per-pixel noise
            col = PALETTE[GRASS] + n * np.array([8.0, 22.0, 6.0])
        elif cls == ROAD:
            col = PALETTE[ROAD] + 4 * n
        elif cls == BUILDING:  # walls with a regular grid of dark windows
            col = _building(r, c, instance[r, c], geometry, h) + 3 * n
        elif cls == TREE:  # dark green with low-frequency blotches
            blotch = _smooth_noise(rng, h, w, cell=max(3, h // 12))[r, c][:, None]
            col = PALETTE[TREE] + blotch * np.array([12.0, 30.0, 12.0]) + 6 * n
        else:  # don't-care: random colours
            col = rng.integers(0, 256, (r.size, 3)).astype(np.float32)
        image[r, c] = col
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _building(r: np.ndarray, c: np.ndarray, inst: np.ndarray, geometry, h: int) -> np.ndarray:
    period = max(4, round(h / 14))
    wall = np.repeat(PALETTE[BUILDING][None].astype(np.float32), r.size, axis=0)
    window = np.zeros(r.size, bool)
    for inst_id, (y0, x0, _, _) in geometry["boxes"].items():
        sel = inst == inst_id
        if not sel.any():
            continue
        wall[sel] *= geometry["wall_gain"][inst_id]
        # Windows in the middle half of each grid cell, leaving wall margins between them.
        dy, dx = (r[sel] - y0) % period, (c[sel] - x0) % period
        q = period / 4
        window[sel] = (dy >= q) & (dy < 3 * q) & (dx >= q) & (dx < 3 * q)
    wall[window] = _WINDOW_COLOR
    return wall


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Bilinearly upsampled coarse Gaussian noise (blobs about `cell` pixels wide), (H, W)."""
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    fy = np.arange(h, dtype=np.float32) / cell
    fx = np.arange(w, dtype=np.float32) / cell
    y0, x0 = fy.astype(np.int64), fx.astype(np.int64)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x0 + 1] * wx
    bottom = coarse[y0 + 1][:, x0] * (1 - wx) + coarse[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


# ---------------------------------------------------------------------------------------------
# Source and palette.


class SyntheticSource:
    """grain random-access source of synthetic scenes (`len`, `[index]`).

    Args:
      num_examples: number of scenes.
      height, width: scene size in pixels.
      split: 'train' or 'validation' (disjoint families of scenes).
      use_instance: whether examples carry an 'instance' map.
      seed: scene family (see `generate_scene`).
      with_dontcare: whether don't-care patches may appear.
    """

    def __init__(
        self,
        num_examples: int,
        height: int,
        width: int,
        *,
        split: str = "train",
        use_instance: bool = True,
        seed: int = 0,
        with_dontcare: bool = True,
    ):
        if num_examples <= 0:
            raise ValueError(f"synthetic source needs num_examples > 0, got {num_examples}")
        self.num_examples = num_examples
        self.height, self.width = height, width
        self.split, self.use_instance, self.seed = split, use_instance, seed
        self.with_dontcare = with_dontcare

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"synthetic {self.split} index {index} outside [0, {len(self)})")
        scene = generate_scene(
            int(index),
            self.height,
            self.width,
            seed=self.seed,
            split=self.split,
            with_dontcare=self.with_dontcare,
        )
        if not self.use_instance:
            del scene["instance"]
        scene["name"] = f"synthetic_{self.split}_{int(index):07d}"
        return scene

    def __repr__(self) -> str:
        return (
            f"SyntheticSource({self.split}, n={self.num_examples}, {self.height}x{self.width}, "
            f"instance={self.use_instance})"
        )
