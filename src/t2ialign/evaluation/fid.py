"""Fréchet distance (FID) between two image sets, in the features of the world's image-text encoder.

The embedded world's stand-in for FID on Inception features: each set is fitted with a Gaussian in
the shipped encoder's :meth:`~t2ialign.models.encoder.DualEncoder.image_features` (the
pre-projection features), and

    FID = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)).

The matrix square root follows the standard implementations (pytorch-fid, clean-fid):
``scipy.linalg.sqrtm`` of the product; if that is not finite (a near-singular product), both
covariances are offset by ``eps * I``; a small imaginary part left by round-off is dropped, and a
large one is an error. The figure depends on the number of images (it is biased upwards for small
sets), so compare FIDs only at equal set sizes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

IMAG_ATOL = 1e-3  # largest imaginary part of diag(sqrtm) treated as round-off (as pytorch-fid)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64; needs N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> np.ndarray:
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > IMAG_ATOL:
            raise ValueError(f"sqrtm of the covariance product has a large imaginary part ({imag:.3g})")
        covmean = covmean.real
    return covmean


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm_product(sigma1, sigma2, eps)
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(d)


@functools.lru_cache(maxsize=1)
def _default_encoder():
    from t2ialign.models.encoder import load_encoder

    return load_encoder()


def _load_folder(folder: Path, size: int) -> np.ndarray:
    from t2ialign.world.imagefolder import MANIFEST, load_image, read_manifest

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    if (folder / MANIFEST).exists():
        files = [folder / r["file"] for r in read_manifest(folder)]
    else:
        files = sorted(folder.glob("*.png"))
    if not files:
        raise ValueError(f"{folder}: no images (expected {MANIFEST} or *.png files)")
    return np.stack([load_image(f, size=size) for f in files])


def _as_images(images, size: int) -> np.ndarray:
    if isinstance(images, (str, Path)):
        return _load_folder(Path(images), size)
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(f"images must be uint8 of shape (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (size, size):
        raise ValueError(f"the encoder takes {size}x{size} images, got {arr.shape[2]}x{arr.shape[1]}")
    return arr


@torch.no_grad()
def image_features(images, encoder=None, batch_size: int = 256) -> np.ndarray:
    """Encoder image features (N, feature_dim) of uint8 images (N, H, W, 3) or an image folder
    (the files of its ``manifest.jsonl``, else its ``*.png`` in name order)."""
    enc = encoder if encoder is not None else _default_encoder()
    arr = _as_images(images, enc.config.image_size)
    out = []
    for i in range(0, len(arr), batch_size):
        x = torch.from_numpy(arr[i : i + batch_size]).to(enc.device).permute(0, 3, 1, 2).float() / 255.0
        out.append(enc.image_features(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, enc.config.feature_dim))


def fid(images_a, images_b, encoder=None) -> float:
    """FID between two image sets (uint8 arrays (N, H, W, 3) or image folders) in the encoder's
    image features (the shipped encoder when ``encoder`` is None). Each set needs 2 images or more;
    use equal, and large, set sizes when comparing figures."""
    fa = image_features(images_a, encoder)
    fb = image_features(images_b, encoder)
    return frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
