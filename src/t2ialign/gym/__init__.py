"""A 2-D points world with a known optimum, behind the same backend interface as the image models:
every trainer of :mod:`t2ialign.algorithms` runs on it unchanged, and its result can be checked
against the closed form of the KL-regularised optimum (:mod:`t2ialign.gym.measure`)."""

from t2ialign.gym.measure import GymScore, q_star, score_backend, score_points
from t2ialign.gym.model import FlowMLP, GymBackend, PretrainConfig, load_gym_backend, pretrain
from t2ialign.gym.world import GymWorld, SmoothReward, SuccessReward, images_to_points, points_to_images

__all__ = [
    "FlowMLP",
    "GymBackend",
    "GymScore",
    "GymWorld",
    "PretrainConfig",
    "SmoothReward",
    "SuccessReward",
    "images_to_points",
    "load_gym_backend",
    "points_to_images",
    "pretrain",
    "q_star",
    "score_backend",
    "score_points",
]
