"""clade_jax.visualize (label colours, image grids) and clade_jax.inference.to_uint8 (the one
quantization of images to uint8, with its two roundings)."""

import numpy as np
import pytest

from clade_jax.data import synthetic as S
from clade_jax.inference import to_uint8
from clade_jax.visualize import colorize, generic_palette, image_grid


def test_colorize_for_synthetic_and_any_number_of_classes():
    lab = S.generate_scene(0, 16, 16)["label"]
    np.testing.assert_array_equal(colorize(lab), S.PALETTE[lab])
    batch = np.stack([lab, lab])
    assert colorize(batch).shape == (2, 16, 16, 3)
    palette = generic_palette(183)
    assert len({tuple(c) for c in palette}) == 183
    ade = np.array([[0, 150], [3, 42]])
    np.testing.assert_array_equal(colorize(ade, num_classes=151), generic_palette(151)[ade])
    with pytest.raises(ValueError, match=r"colorize: 1 pixels .*: 151"):
        colorize(np.array([[151]]), num_classes=151)


def test_to_uint8_truncates_like_tensor2im_and_nearest_inverts_the_pipeline():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # the pipeline's scaling
    np.testing.assert_array_equal(to_uint8(x, "nearest"), u8)
    # Truncation (official tensor2im): (x + 1) / 2 * 255 floored, clipped.
    y = np.array([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0], np.float32)
    np.testing.assert_array_equal(to_uint8(y), [0, 0, 127, 254, 255, 255])
    np.testing.assert_array_equal(to_uint8(y, "nearest"), [0, 0, 128, 255, 255, 255])
    assert to_uint8(u8) is u8 or np.shares_memory(to_uint8(u8), u8)  # uint8 passes through
    with pytest.raises(ValueError, match="rounding"):
        to_uint8(y, "floor")


def test_image_grid_rows_are_label_fake_real():
    labels = np.stack([S.generate_scene(i, 8, 8)["label"] for i in range(2)])
    fake = np.full((2, 8, 8, 3), -1.0, np.float32)
    real = np.full((2, 8, 8, 3), 1.0, np.float32)
    grid = image_grid(labels, fake, real, S.NUM_CLASSES)
    assert grid.shape == (16, 24, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[8:, :8], colorize(labels[1]))
    assert (grid[:, 8:16] == 0).all() and (grid[:, 16:] == 255).all()


def test_pad_batch_repeats_the_last_row():
    from clade_jax.inference import pad_batch

    x = np.arange(6).reshape(3, 2)
    np.testing.assert_array_equal(pad_batch(x, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    assert pad_batch(x, 3) is x
    with pytest.raises(ValueError, match="4"):
        pad_batch(np.zeros((4, 1)), 3)
