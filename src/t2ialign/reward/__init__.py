"""Reward models and reward functions (stage 2 of Lee et al. 2023).

::

    from t2ialign.feedback import FeedbackStore
    from t2ialign.reward import RewardTrainConfig, train_reward_model, ModelReward, checker_reward

    model = train_reward_model(FeedbackStore.open("proj"), RewardTrainConfig(), out="reward/")
    reward_fn = ModelReward.load("reward/")
    rewards, info = reward_fn(images, prompts, None)     # images (B, 3, H, W) in [0, 1]

Modules: ``model`` (the frozen backbone + MLP head, checkpoints), ``clip`` (CLIP from a local
folder as a backbone), ``losses`` (MSE, prompt classification, Bradley-Terry), ``train`` (training
from a feedback project), ``rewards`` (the reward-function interface and its implementations),
``eval`` (accuracy, ROC AUC and calibration error per split).
"""

from t2ialign.reward.losses import bradley_terry_loss, mse_loss, prompt_classification_loss, total_loss
from t2ialign.reward.model import (
    EncoderBackbone,
    RewardHead,
    RewardHeadConfig,
    RewardModel,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from t2ialign.reward.rewards import (
    ModelReward,
    SimilarityReward,
    checker_reward,
    counting_reward,
    mix_rewards,
    partial_credit_reward,
)
from t2ialign.reward.train import RewardTrainConfig, candidate_prompts, train_reward_model

__all__ = [
    "EncoderBackbone",
    "ModelReward",
    "RewardHead",
    "RewardHeadConfig",
    "RewardModel",
    "RewardTrainConfig",
    "SimilarityReward",
    "bradley_terry_loss",
    "build_reward_model",
    "candidate_prompts",
    "checker_reward",
    "counting_reward",
    "load_reward_model",
    "mix_rewards",
    "mse_loss",
    "partial_credit_reward",
    "prompt_classification_loss",
    "save_reward_model",
    "total_loss",
    "train_reward_model",
]
