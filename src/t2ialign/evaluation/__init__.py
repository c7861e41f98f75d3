"""Evaluation beyond the ShapesEval checker: fidelity (FID in the image-text encoder's features)."""

from t2ialign.evaluation.fid import fid, frechet_distance, gaussian_stats, image_features

__all__ = ["fid", "frechet_distance", "gaussian_stats", "image_features"]
