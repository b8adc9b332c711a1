"""Tests of clade_jax.evaluation.fid: feature parity with the PyTorch reference, and the distance.

The parity fixture (shared/fixtures/fid_reference.npz) holds pool3 features computed by the
TorchScript FID Inception in PyTorch, for 299x299 images (network only) and 256x256 images
(pytorch-fid's bilinear resize, then the network). These tests need the converted weights, which
`make test` prepares with `python -m clade_jax.weights inception`; without them they fail with
that command in the message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

from clade_jax import weights
from clade_jax.evaluation import fid

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "fid_reference.npz")


@pytest.fixture(scope="module")
def extractor():
    return fid.InceptionFeatures()


@pytest.mark.parametrize("size", [299, 256])
def test_features_match_pytorch(extractor, reference, size):
    images, ref = reference[f"images_{size}"], reference[f"features_{size}"]
    got = extractor(images)
    assert got.shape == (images.shape[0], fid.FEATURE_DIM) and got.dtype == np.float32
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    max_abs = np.abs(got - ref).max()
    print(f"features_{size}: relative error {rel:.3g}, max abs diff {max_abs:.3g}")
    assert rel <= 1e-4, (rel, max_abs)


def test_batching_does_not_change_features(reference):
    images, ref = reference["images_256"][:3], reference["features_256"][:3]
    state = weights.load_inception_state(weights.inception_path())  # a state dict also works
    small = fid.InceptionFeatures(state, batch_size=2)  # a batch of 2, then 1 padded to 2
    got = small(images)
    assert got.shape == ref.shape
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-4


def test_fixture_weights_hash_is_the_one_we_check():
    meta = json.loads(str(np.load(FIXTURES / "fid_reference.npz")["meta"]))
    assert meta["sha256_of_pt"] == weights.FID_HELPER_SHA256


def test_rejects_non_uint8(extractor):
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((1, 299, 299, 3), np.float32))


def test_missing_weights_error_gives_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CLADE_JAX_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m clade_jax.weights inception"):
        fid.InceptionFeatures()


def test_statistics_are_numpy_mean_and_unbiased_cov():
    feats = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    mu, sigma = fid.statistics(feats)
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0))
    centered = feats - feats.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centered.T @ centered / 49)


def test_fid_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(1).normal(size=(200, 16))
    mu, sigma = fid.statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fid_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_fid_closed_form_rotated_gaussians():
    # Same rotation for both covariances: they commute, so sqrtm(s1 s2) = Q sqrt(d1 d2) Q^T.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    got = fid.frechet_distance(
        np.zeros(6), q @ np.diag(d1) @ q.T, np.ones(6), q @ np.diag(d2) @ q.T
    )
    want = 6.0 + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_fid_with_rank_deficient_covariances_is_finite():
    # Fewer samples than dimensions: singular covariances, a (numerically) complex square root.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.5
    value = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    assert np.isfinite(value) and value > 0


def _fid_via_sqrtm(mu1, s1, mu2, s2):
    """pytorch-fid's formula with scipy's matrix square root (the reference, not the code)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real


def test_fid_equals_pytorch_fids_sqrtm_form_on_full_rank_covariances():
    # Non-commuting, full-rank covariances: the eigenvalue form must equal Tr sqrtm(s1 s2).
    rng = np.random.default_rng(6)
    a = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64))
    b = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) + 1.0
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    want = _fid_via_sqrtm(mu1, s1, mu2, s2)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-10)
    # The distance is symmetric although sqrt(s1) s2 sqrt(s1) is formed from s1 only.
    np.testing.assert_allclose(fid.frechet_distance(mu2, s2, mu1, s1), want, rtol=1e-10)


def test_fid_with_fewer_samples_than_dimensions_matches_the_exact_value():
    # 12 samples in 128 dimensions (as 500 Cityscapes images against 2048 features): the product
    # has rank 11. Exact reference: the non-zero eigenvalues of s1 s2 are those of the 12 x 12
    # matrix A s2 A^T / (n - 1) (A the centred samples). Counting the rounding-level eigenvalues
    # (no rank tolerance) is off by 2e-8; pytorch-fid's sqrtm by 4e-8.
    rng = np.random.default_rng(5)
    n, d = 12, 128
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 1.0
    (mu1, s1), (mu2, s2) = fid.statistics(a), fid.statistics(b)
    centred = a - a.mean(axis=0)
    small = np.linalg.eigvalsh(centred @ s2 @ centred.T / (n - 1))
    trace = np.sqrt(np.clip(small, 0.0, None)).sum()
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-9)
    np.testing.assert_allclose(_fid_via_sqrtm(mu1, s1, mu2, s2), want, rtol=1e-6)


def test_fid_treats_rounding_level_negative_eigenvalues_as_zero():
    # -1e-9 is rounding (its root's imaginary part, 3e-5, is under pytorch-fid's 1e-3): the
    # value is that of the clipped covariance.
    s2 = np.diag([4.0, -1e-9])
    got = fid.frechet_distance(np.zeros(2), np.diag([1.0, 1.0]), np.zeros(2), s2)
    np.testing.assert_allclose(got, 1.0 + 1.0 + 4.0 - 1e-9 - 2 * 2.0, rtol=1e-12)


@pytest.mark.parametrize(
    "s1, s2, name",
    [
        (np.eye(2), np.diag([1.0, -0.01]), "sqrt(sigma1) sigma2 sqrt(sigma1)"),  # a root of 0.1i
        (np.diag([1.0, -0.01]), np.eye(2), "sigma1"),
    ],
)
def test_fid_rejects_a_covariance_that_is_not_positive_semi_definite(s1, s2, name):
    with pytest.raises(
        ValueError, match=re.escape(name) + " is not positive semi-definite.*imaginary"
    ):
        fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)


def test_fid_rejects_non_finite_statistics():
    sigma = np.eye(2)
    sigma[0, 1] = np.nan
    with pytest.raises(ValueError, match="sigma2 has non-finite"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), sigma)
    with pytest.raises(ValueError, match="mu1 has non-finite"):
        fid.frechet_distance(np.array([np.inf, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_prepare_inception_is_idempotent(tmp_path, monkeypatch):
    (tmp_path / weights.INCEPTION_FILENAME).symlink_to(weights.inception_path())
    monkeypatch.setenv("CLADE_JAX_CACHE", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("a valid cached npz must not be downloaded again")

    monkeypatch.setattr(weights.subprocess, "run", no_download)
    assert weights.prepare_inception() == tmp_path / weights.INCEPTION_FILENAME


def test_cached_statistics(tmp_path, caplog):
    import logging

    calls = []

    def batches():
        calls.append(1)
        rng = np.random.default_rng(5)
        for _ in range(3):
            yield rng.integers(0, 256, size=(4, 8, 6, 3), dtype=np.uint8)

    # A cheap stand-in extractor: per-image channel means (3 features).
    def extractor(images):
        return images.astype(np.float32).mean(axis=(1, 2))

    stem = tmp_path / "stats" / "val"
    with caplog.at_level(logging.INFO, logger="clade_jax.evaluation"):
        mu, sigma = fid.cached_statistics(
            stem, batches, count=10, resolution=(8, 6), extractor=extractor
        )
    path = tmp_path / "stats" / "val_n10_8x6.npz"
    assert path.is_file() and len(calls) == 1
    # Off a terminal (pytest captures the output): the closing progress line with the count.
    lines = [r.getMessage() for r in caplog.records if r.name == "clade_jax.evaluation"]
    assert any(x.startswith("FID reference statistics 10/10 | ") for x in lines), lines
    all_images = np.concatenate(list(batches()))[:10]
    calls.pop()
    want_mu, want_sigma = fid.statistics(extractor(all_images))
    np.testing.assert_allclose(mu, want_mu)
    np.testing.assert_allclose(sigma, want_sigma)
    # Second call: read from the file, the image source is not touched.
    mu2, sigma2 = fid.cached_statistics(stem, batches, count=10, resolution=(8, 6))
    assert len(calls) == 1
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # Asking for more images than the source has is an error, and nothing is cached.
    with pytest.raises(ValueError, match="gave 12 images, 20 were requested"):
        fid.cached_statistics(stem, batches, count=20, resolution=(8, 6), extractor=extractor)
    assert not (tmp_path / "stats" / "val_n20_8x6.npz").exists()
    with pytest.raises(ValueError, match="resolution"):
        fid.cached_statistics(stem, batches, count=4, resolution=(8, 8), extractor=extractor)
