"""GPU recipes: the published settings of DDPO on SD 1.5 and of Flow-GRPO and DiffusionNFT on
SD3.5-Medium, as the algorithms' config dataclasses plus the backend options that go with them.

Sources (public reference code and papers; METHODS.md section 2):

- DDPO, ``kvablack/ddpo-pytorch`` ``config/base.py`` and ``config/dgx.py`` (``aesthetic``): 50 DDIM
  steps with eta = 1, guidance 5, PPO clip 1e-4, advantages clipped to 5, per-prompt statistics
  (buffer 32, min count 16), 256 samples per epoch, 2 optimiser steps per epoch (128 samples each),
  200 epochs, AdamW lr 3e-4 / weight decay 1e-4, gradient norm 1, LoRA on the UNet's attention
  (rank 4, scale 1), 512 px.
- Flow-GRPO, ``yifan123/flow_grpo`` ``config/base.py`` / ``config/grpo.py`` (``geneval_sd3``,
  ``pickscore_sd3``, ``general_ocr_sd3``) and ``scripts/train_sd3.py``: G = 24 images per prompt,
  48 prompts per epoch, 10 sampling (and training) steps, 40 for evaluation, guidance 4.5, SDE noise
  a = 0.7, KL beta 0.04 (GenEval, OCR) or 0.01 (PickScore), PPO clip 1e-4, advantages clipped to
  5, 2 optimiser steps per epoch, AdamW lr 3e-4 / weight decay 1e-4, gradient norm 1, LoRA r 32
  alpha 64 (gaussian init) on the joint attention, T5 length 128, 512 px.
- DiffusionNFT, the authors' ``config/nft.py`` / ``config/base.py`` and ``scripts/train_nft_sd3.py``:
  the same model, LoRA, prompts and group size, 10 deterministic sampling steps without CFG
  (guidance 1), NFT beta 1 (GenEval, PickScore) or 0.1 (OCR), KL weight 1e-4, rewards normalised by
  the global std, one optimiser step per epoch, the old policy's EMA ramp 0.001 per step up to 0.5.

The trainers here forward a whole ``minibatch_size`` / ``train_batch_size`` at once (no gradient
accumulation), while the published runs spread it over 8-32 GPUs and accumulation steps. The presets
keep the published effective batch (so the number of optimiser steps per iteration matches); on one
GPU pass a smaller one (``minibatch_size=...``) and turn on gradient checkpointing (see
docs/GPU_RECIPES.md for what that changes).

The algorithm modules are imported lazily, inside each function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SD35_LORA_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]
"""Flow-GRPO's and DiffusionNFT's LoRA targets on SD3.5's transformer (``attn2`` is left out)."""

FLOW_GRPO_KL = {"geneval": 0.04, "ocr": 0.04, "pickscore": 0.01}
NFT_BETA = {"geneval": 1.0, "ocr": 0.1, "pickscore": 1.0}


@dataclass
class Recipe:
    """A preset: the trainer's config, ``load_backend`` options, and the evaluation sampler."""

    name: str
    method: str
    config: Any
    backend_options: dict
    eval_steps: int
    eval_guidance: float
    notes: list[str] = field(default_factory=list)


# ---- SD 1.5: DDPO --------------------------------------------------------------------------------


def sd15_ddpo(iterations: int = 200, minibatch_size: int = 128, **overrides):
    """DDPO-IS on Stable Diffusion 1.5 with LoRA (ddpo-pytorch's ``aesthetic`` run)."""
    from t2ialign.algorithms.ddpo import DDPOConfig

    cfg = dict(
        iterations=iterations,
        batch_size=256,
        train_steps=50,
        guidance=5.0,
        variant="is",
        clip_range=1e-4,
        adv_clip_max=5.0,
        per_prompt_stats=True,
        buffer_size=32,
        min_count=16,
        inner_epochs=1,
        minibatch_size=minibatch_size,
        timestep_fraction=1.0,
        lr=3e-4,
        weight_decay=1e-4,
        lora_rank=4,
        lora_alpha=4.0,
        grad_clip=1.0,
    )
    return DDPOConfig(**{**cfg, **overrides})


def sd15_ddpo_backend() -> dict:
    """``load_backend`` options for :func:`sd15_ddpo`: DDIM with eta = 1, 512 px. Published runs used
    fp16 with a gradient scaler; the trainers here have no scaler, so bfloat16 is the safe choice."""
    return {"eta": 1.0, "resolution": 512, "dtype": "bfloat16", "gradient_checkpointing": False}


# ---- SD3.5-Medium: Flow-GRPO ---------------------------------------------------------------------


def _check_reward(reward: str, table: dict) -> None:
    if reward not in table:
        raise ValueError(f"reward must be one of {', '.join(table)}, got {reward!r}")


def sd35m_flow_grpo(reward: str = "geneval", iterations: int = 1000, minibatch_size: int = 576, **overrides):
    """Flow-GRPO on SD3.5-Medium with LoRA. ``reward`` picks the KL weight (GenEval and OCR 0.04,
    PickScore 0.01). The published runs were stopped by hand; ``iterations`` is a budget, not a
    published number."""
    from t2ialign.algorithms.grpo import GRPOConfig

    _check_reward(reward, FLOW_GRPO_KL)
    cfg = dict(
        iterations=iterations,
        prompts_per_iter=48,
        group_size=24,
        train_steps=10,
        guidance=4.5,
        beta=FLOW_GRPO_KL[reward],
        clip_range=1e-4,
        adv_clip_max=5.0,
        inner_epochs=1,
        minibatch_size=minibatch_size,
        timestep_fraction=0.9,
        lr=3e-4,
        weight_decay=1e-4,
        lora_rank=32,
        lora_alpha=64.0,
        grad_clip=1.0,
    )
    return GRPOConfig(**{**cfg, **overrides})


def sd35m_backend() -> dict:
    """``load_backend`` options for the SD3.5-Medium recipes: 512 px, SDE noise a = 0.7, T5 length
    128, bfloat16, the reference code's LoRA targets and gaussian init."""
    return {
        "sde_a": 0.7,
        "resolution": 512,
        "max_sequence_length": 128,
        "dtype": "bfloat16",
        "gradient_checkpointing": False,
        "lora_targets": list(SD35_LORA_TARGETS),
        "lora_init": "gaussian",
    }


# ---- SD3.5-Medium: DiffusionNFT ------------------------------------------------------------------


def sd35m_nft(reward: str = "geneval", iterations: int = 1000, train_batch_size: int = 1152, **overrides):
    """DiffusionNFT on SD3.5-Medium with LoRA, CFG-free. ``reward`` picks NFT's beta (1 for GenEval and
    PickScore, 0.1 for OCR) and the old policy's EMA ramp."""
    from t2ialign.algorithms.nft import NFTConfig

    _check_reward(reward, NFT_BETA)
    # decay_type 1: eta = min(0.001 * step, 0.5); decay_type 2 (OCR): min(0.0075 * (step - 75), 0.999)
    # after 75 on-policy steps, whose flat start NFTConfig cannot express.
    ema_rate, ema_max = (0.0075, 0.999) if reward == "ocr" else (0.001, 0.5)
    cfg = dict(
        iterations=iterations,
        prompts_per_iter=48,
        group_size=24,
        sample_steps=10,
        sampler="ode",
        guidance=1.0,
        beta=NFT_BETA[reward],
        adv_clip=5.0,
        normaliser="global_std",
        train_batch_size=train_batch_size,
        inner_epochs=1,
        kl_weight=1e-4,
        ema_rate=ema_rate,
        ema_max=ema_max,
        lr=3e-4,
        lora_rank=32,
        lora_alpha=64.0,
        grad_clip=1.0,
    )
    return NFTConfig(**{**cfg, **overrides})


# ---- the table -----------------------------------------------------------------------------------

RECIPES = ("sd15-ddpo", "sd35m-flow-grpo", "sd35m-nft")


def recipe(name: str, **overrides) -> Recipe:
    """One of :data:`RECIPES` with its backend options and evaluation sampler; ``overrides`` go to the
    config function (``reward=``, ``iterations=``, ``minibatch_size=`` or any config field)."""
    if name == "sd15-ddpo":
        return Recipe(
            name,
            "ddpo",
            sd15_ddpo(**overrides),
            sd15_ddpo_backend(),
            eval_steps=50,
            eval_guidance=5.0,
            notes=["published on SD 1.4/1.5 with 8 GPUs: 256 samples and 2 optimiser steps per epoch"],
        )
    if name == "sd35m-flow-grpo":
        return Recipe(
            name,
            "grpo",
            sd35m_flow_grpo(**overrides),
            sd35m_backend(),
            eval_steps=40,
            eval_guidance=4.5,
            notes=[
                "the reference trains the first 9 of the 10 steps (timestep_fraction 0.99); "
                "here a random 9 of 10",
                "the reference normalises advantages by the global "
                "std of the epoch; GRPOConfig uses each group's",
            ],
        )
    if name == "sd35m-nft":
        return Recipe(
            name,
            "nft",
            sd35m_nft(**overrides),
            sd35m_backend(),
            eval_steps=40,
            eval_guidance=1.0,
            notes=[
                "the reference samples with a 2nd-order DPM solver; NFTConfig's 'ode' is Euler",
                "the reference re-noises at the 10 sampling timesteps; here s ~ U(0, 1)",
            ],
        )
    raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
