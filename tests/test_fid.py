"""FID (``t2ialign.evaluation.fid``): the Fréchet distance against closed forms, and FID of image sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_helpers import one_thread, tiny_encoder
from t2ialign.evaluation.fid import fid, frechet_distance, gaussian_stats, image_features
from t2ialign.world import random_spec, render
from t2ialign.world.imagefolder import save_image


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def _sym_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference(mu1, s1, mu2, s2) -> float:
    """The symmetric form Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by eigendecompositions."""
    r = _sym_sqrt(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _sym_sqrt(r @ s2 @ r)))


def test_one_dimension():
    # N(1, 2^2) and N(-2, 0.5^2): (1 + 2)^2 + (2 - 0.5)^2
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]]))
    assert math.isclose(d, 9 + 2.25, rel_tol=1e-9)


def test_diagonal_covariances():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # 5 + 1 + 1 + 0
    assert math.isclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rel_tol=1e-9)


def test_general_covariances_against_the_symmetric_form():
    rng = np.random.default_rng(0)
    for d in (2, 8, 40):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(d, rng), _spd(d, rng)
        assert math.isclose(frechet_distance(mu1, s1, mu2, s2), _reference(mu1, s1, mu2, s2), rel_tol=1e-6)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
        # symmetric in its two arguments
        assert math.isclose(
            frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1), rel_tol=1e-6
        )


def test_singular_covariances_stay_finite_and_close():
    """Fewer samples than dimensions: rank-deficient covariances (the standard implementations' case
    for the eps offset and for dropping round-off imaginary parts)."""
    rng = np.random.default_rng(1)
    d = 30
    s1, s2 = _spd(d, rng, rank=5), _spd(d, rng, rank=5)
    mu = np.zeros(d)
    val = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(val)
    assert abs(val - _reference(mu, s1, mu, s2)) < 1e-3 * np.trace(s1 + s2)
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-3 * np.trace(s1)


def test_gaussian_stats_and_sampled_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2, cov = np.array([0.0, 0.0]), np.array([3.0, 4.0]), np.array([[2.0, 0.5], [0.5, 1.0]])
    x, y = rng.multivariate_normal(mu1, cov, 20000), rng.multivariate_normal(mu2, cov, 20000)
    m, s = gaussian_stats(x)
    assert np.allclose(m, mu1, atol=0.05) and np.allclose(s, cov, atol=0.06)
    assert math.isclose(frechet_distance(*gaussian_stats(x), *gaussian_stats(y)), 25.0, rel_tol=0.02)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu1, cov, np.zeros(3), np.eye(3))


@pytest.fixture(scope="module")
def renders() -> np.ndarray:
    rng = np.random.default_rng(3)
    return np.stack([render(random_spec(rng), seed=i) for i in range(48)])


def test_fid_of_a_set_with_itself_is_zero(renders):
    enc = tiny_encoder(seed=0)  # feature_dim 32 < 48 images
    assert abs(fid(renders, renders, encoder=enc)) < 1e-6
    other = renders[::-1].copy()  # the same set in another order
    assert abs(fid(renders, other, encoder=enc)) < 1e-6
    noise = np.random.default_rng(4).integers(0, 256, renders.shape, dtype=np.uint8)
    assert fid(renders, noise, encoder=enc) > 1e-3


def test_fid_with_the_shipped_encoder_and_folders(renders, tmp_path):
    """The default encoder (256 features) on 24 images: a singular covariance, handled; a folder of
    PNGs reads the same as the array. (One 256 x 256 sqrtm only: it is the slow part.)"""
    for i, img in enumerate(renders[:24]):
        save_image(img, tmp_path / f"{i:03d}.png")
    assert abs(fid(tmp_path, renders[:24])) < 1e-4
    feats = image_features(tmp_path)
    assert feats.shape == (24, 256) and feats.dtype == np.float64
    enc = tiny_encoder(seed=0)
    assert fid(renders[:24], renders[24:], encoder=enc) > 0
    with pytest.raises(ValueError, match="uint8"):
        fid(renders.astype(np.float32), renders, encoder=enc)
    with pytest.raises(ValueError, match="32x32"):
        fid(renders[:, :16, :16], renders[:, :16, :16], encoder=enc)
    with pytest.raises(FileNotFoundError):
        fid(tmp_path / "nowhere", renders, encoder=enc)


def test_image_features_match_the_encoder(renders):
    enc = tiny_encoder(seed=1)
    feats = image_features(renders[:5], encoder=enc, batch_size=2)
    with torch.no_grad():
        ref = enc.image_features(torch.from_numpy(renders[:5]).permute(0, 3, 1, 2).float() / 255)
    assert np.allclose(feats, ref.double().numpy(), atol=1e-6)
