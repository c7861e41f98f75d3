"""``t2ialign gym --method METHOD``: train one alignment method on the 2-D gym and judge it against the
known optimum (:mod:`t2ialign.gym`).

The CLI is the one place where names map to callables: METHOD to a trainer of
:mod:`t2ialign.algorithms`, its config dataclass and the gym's settings of that config
(:func:`_methods`). Every trainer runs unchanged on :class:`t2ialign.gym.GymBackend`; the online ones
score with the 0/1 reward (:class:`~t2ialign.gym.SuccessReward`), ReFL and DRaFT with its smooth
variant, RWR and DPO learn offline from the base's labelled samples (:mod:`t2ialign.gym.feedback`).

Time is CPU time of this process (``time.process_time``: run with ``OMP_NUM_THREADS=1`` for one
thread), without the evaluations of the learning curve. With ``--budget-seconds`` the trainer runs
until the budget is spent (its iteration count is set out of reach and the run is stopped from the
logger), and the model is judged as it stands: what a trainer does after its last iteration is
skipped (saving, and RWR's swap to its EMA weights, which the gym turns off with ``ema = 0``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t2ialign.cli.common import add_command, print_table


@dataclass
class GymMethod:
    """How the gym runs one method: ``train`` (a trainer of :mod:`t2ialign.algorithms`), its config
    class, the data it takes (``"reward"``: the 0/1 reward; ``"smooth"``: the differentiable reward;
    ``"weighted"``: RWR's weighted samples; ``"pairs"``: DPO's pairs), the gym's config settings, the
    config field that counts its iterations, the field that is a KL coefficient (if any) and whether
    the trainer takes ``pretrain_source`` (then it gets the web-labelled data)."""

    train: Callable
    config: type
    data: str
    defaults: dict = field(default_factory=dict)
    count_field: str = "iterations"
    kl_field: str | None = None
    pretrain_source: bool = False


def _methods() -> dict[str, GymMethod]:
    from t2ialign.algorithms.ddpo import DDPOConfig, train_ddpo
    from t2ialign.algorithms.dpo import DPOConfig, train_dpo
    from t2ialign.algorithms.grpo import GRPOConfig, train_grpo
    from t2ialign.algorithms.mixgrpo import MixGRPOConfig, train_mixgrpo
    from t2ialign.algorithms.nft import NFTConfig, train_nft
    from t2ialign.algorithms.nft_labelled import LabelledNFTConfig, train_nft_labelled
    from t2ialign.algorithms.raft import RAFTConfig, train_raft
    from t2ialign.algorithms.refl import DRaFTConfig, ReFLConfig, train_draft, train_refl
    from t2ialign.algorithms.rwr import RWRConfig, train_rwr

    online = {"guidance": 1.0}  # the base the closed form speaks of: the conditional model
    group = {**online, "prompts_per_iter": 4, "group_size": 16, "minibatch_size": 64, "lr": 1e-3}
    return {
        "rwr": GymMethod(
            train_rwr,
            RWRConfig,
            "weighted",
            {"steps": 500, "batch_size": 256, "beta": 0.0, "ema": 0.0, "lr": 3e-3},
            "steps",
        ),
        "nft-labelled": GymMethod(
            train_nft_labelled,
            LabelledNFTConfig,
            "weighted",
            {"steps": 500, "batch_size": 256, "beta": 0.3, "adv_clip": 1.0, "lr": 3e-3},
            "steps",
        ),
        "ddpo": GymMethod(
            train_ddpo,
            DDPOConfig,
            "reward",
            {**online, "batch_size": 64, "minibatch_size": 64, "lr": 3e-3, "iterations": 200},
        ),
        "grpo": GymMethod(train_grpo, GRPOConfig, "reward", {**group, "iterations": 200}, kl_field="beta"),
        "mixgrpo": GymMethod(
            train_mixgrpo,
            MixGRPOConfig,
            "reward",
            {**group, "window_shift_every": 5, "iterations": 200},
            kl_field="beta",
        ),
        "nft": GymMethod(
            train_nft,
            NFTConfig,
            "reward",
            {
                **online,
                "prompts_per_iter": 4,
                "group_size": 16,
                "train_batch_size": 64,
                "sample_steps": 20,
                "ema_max": 0.9,
                "lr": 5e-4,
                "iterations": 500,
            },
            pretrain_source=True,
        ),
        "raft": GymMethod(
            train_raft,
            RAFTConfig,
            "reward",
            {
                **online,
                "prompts_per_round": 256,
                "samples_per_prompt": 4,
                "batch_size": 64,
                "lr": 3e-4,
                "rounds": 40,
            },
            "rounds",
            pretrain_source=True,
        ),
        "refl": GymMethod(
            train_refl,
            ReFLConfig,
            "smooth",
            {
                **online,
                "batch_size": 64,
                "margin": 1.0,
                "pretrain_weight": 0.0,
                "lr": 1e-3,
                "iterations": 300,
            },
            pretrain_source=True,
        ),
        "draft": GymMethod(
            train_draft,
            DRaFTConfig,
            "smooth",
            {**online, "batch_size": 64, "pretrain_weight": 0.0, "lr": 1e-3, "iterations": 300},
            pretrain_source=True,
        ),
        "dpo": GymMethod(
            train_dpo, DPOConfig, "pairs", {"batch_size": 64, "beta": 2.0, "lr": 3e-3, "steps": 500}, "steps"
        ),
    }


METHOD_NAMES = ("rwr", "nft-labelled", "ddpo", "grpo", "mixgrpo", "nft", "raft", "refl", "draft", "dpo")


class BudgetSpent(Exception):
    """Raised from the logger to end a run whose CPU budget is spent."""


class CurveLogger:
    """The trainers' logger (``log(step, row)``, ``close()``): every ``eval_every`` CPU seconds it scores
    the model (``score(backend)`` -> GymScore, not timed), and it stops the run once ``budget``
    CPU seconds are spent."""

    def __init__(self, backend, score: Callable, eval_every: float, budget: float | None):
        self.backend, self.score, self.eval_every, self.budget = backend, score, eval_every, budget
        self.curve: list[dict] = []
        self.paused = 0.0
        self.start = time.process_time()
        self.next_eval = 0.0
        self.steps = 0

    def seconds(self) -> float:
        return time.process_time() - self.start - self.paused

    def point(self, step: int, reward: float | None = None) -> None:
        t0 = time.process_time()
        sc = self.score(self.backend)
        row = {
            "seconds": round(self.seconds(), 3),
            "step": step,
            "success": sc.success,
            "mode_entropy": sc.mode_entropy,
        }
        if reward is not None:
            row["reward_mean"] = reward
        self.curve.append(row)
        self.paused += time.process_time() - t0

    def log(self, step: int, row: dict) -> None:
        self.steps = step
        if self.seconds() >= self.next_eval:
            self.point(step, row.get("reward_mean"))
            self.next_eval = self.seconds() + self.eval_every
        if self.budget is not None and self.seconds() >= self.budget:
            raise BudgetSpent

    def close(self) -> None:
        pass


def _warm_up() -> None:
    """Pay the one-off costs before the clock starts: the first optimiser imports torch._dynamo, LoRA
    imports peft, the trainers tqdm."""
    import peft  # noqa: F401
    import torch
    import tqdm  # noqa: F401

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def make_config(method: GymMethod, settings: list[str], iterations: int | None, budget: float | None):
    """The method's config: the gym's defaults, then ``FIELD=VALUE`` settings (unknown fields are an
    error naming the fields), then the iteration count (out of reach under a budget)."""
    from t2ialign.cli.finetune import apply_overrides

    cfg = apply_overrides(method.config(**method.defaults), list(settings))
    count = 10**9 if budget is not None else iterations
    changes = {"checkpoint_every": 10**9}
    if count is not None:
        changes[method.count_field] = count
    return dataclasses.replace(cfg, **changes)


def run_gym(
    name: str,
    backend,
    settings: list[str] = (),
    *,
    iterations: int | None = None,
    budget_seconds: float | None = None,
    eval_every: float = 5.0,
    eval_per_class: int = 256,
    final_per_class: int = 1024,
    offline_per_class: int = 512,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict:
    """Train method ``name`` on ``backend`` (a fresh :class:`~t2ialign.gym.GymBackend`, fine-tuned in
    place) and return the run's summary: base, final and target success, CPU seconds, within-class
    mode entropy and weights, and the learning curve. ``seed`` seeds the global RNG (LoRA's initial
    adapters draw from it; the trainers seed everything else from their configs)."""
    import torch

    from t2ialign.gym import SmoothReward, SuccessReward, q_star, score_backend
    from t2ialign.gym.feedback import preference_pairs, weighted_samples
    from t2ialign.gym.measure import q_star_grpo

    methods = _methods()
    if name not in methods:
        raise ValueError(f"unknown gym method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    if budget_seconds is not None and budget_seconds <= 0:
        raise ValueError(f"--budget-seconds must be positive, got {budget_seconds}")
    method = methods[name]
    cfg = make_config(method, settings, iterations, budget_seconds)
    world = backend.world
    guidance = float(getattr(cfg, "guidance", 1.0))

    def score(b, n=eval_per_class):
        return score_backend(b, n, steps=20, guidance=guidance)

    base = score(backend, final_per_class)
    # the policy of the chain-based methods is the SDE chain they sample and train on
    chain = getattr(cfg, "train_steps", None)

    def score_sde(b):
        return score_backend(b, final_per_class, steps=chain, guidance=guidance, sampler="sde")

    base_sde = score_sde(backend) if chain else None
    _warm_up()
    torch.manual_seed(seed)
    logger = CurveLogger(backend, score, eval_every, budget_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        run_out = Path(out) if out is not None else Path(tmp)
        try:
            if method.data == "weighted":
                data = weighted_samples(backend, offline_per_class)
                method.train(
                    backend,
                    cfg,
                    data,
                    run_out,
                    pretrain_source=world.web_source(),
                    progress=False,
                    logger=logger,
                )
            elif method.data == "pairs":
                data = preference_pairs(backend, offline_per_class)
                method.train(backend, data, cfg, run_out, progress=False, logger=logger)
            else:
                reward = SmoothReward(world) if method.data == "smooth" else SuccessReward(world)
                kwargs = {"pretrain_source": world.web_source()} if method.pretrain_source else {}
                method.train(
                    backend,
                    reward,
                    world.prompt_rows(),
                    cfg,
                    run_out,
                    progress=False,
                    logger=logger,
                    **kwargs,
                )
        except BudgetSpent:
            pass
    seconds = logger.seconds()
    final = score(backend, final_per_class)
    logger.curve.append(
        {
            "seconds": round(seconds, 3),
            "step": logger.steps,
            "success": final.success,
            "mode_entropy": final.mode_entropy,
        }
    )
    beta = float(getattr(cfg, method.kl_field)) if method.kl_field else 0.0
    sde = {}
    if chain:
        final_sde = score_sde(backend)
        sde = {
            "base_success_sde": base_sde.success,
            "final_success_sde": final_sde.success,
            "target_success_sde": q_star(base_sde.success, beta) if beta > 0 else 1.0,
            "final_mode_entropy_sde": final_sde.mode_entropy,
            "mode_weights_tv_sde": final_sde.weights_tv(base_sde),
        }
    if beta > 0 and chain and hasattr(cfg, "adv_eps"):
        # Flow-GRPO's group-normalised advantages move the KL optimum (see q_star_grpo)
        sde["target_success_normalised_sde"] = q_star_grpo(
            base_sde.success, beta, cfg.group_size, cfg.adv_eps
        )
    reached = [r for r in logger.curve if r["success"] >= 0.95]
    return {
        "method": name,
        "config": asdict(cfg),
        "kl_coefficient": beta if beta > 0 else None,
        "sde_a": backend.sde_a,
        "base_success": base.success,
        "final_success": final.success,
        "target_success": q_star(base.success, beta) if beta > 0 else 1.0,
        "seconds": seconds,
        "steps": logger.steps,
        "base_mode_entropy": base.mode_entropy,
        "final_mode_entropy": final.mode_entropy,
        "mode_entropy_kept": final.mode_entropy / base.mode_entropy if base.mode_entropy > 0 else 0.0,
        "base_mode_weights": base.mode_weights,
        "final_mode_weights": final.mode_weights,
        "mode_weights_tv": final.weights_tv(base),
        "base_class_success": base.class_success,
        "final_class_success": final.class_success,
        "eval_samples": final.n,
        "peak_success": max(r["success"] for r in logger.curve),
        "seconds_to_095": reached[0]["seconds"] if reached else None,
        "mode_entropy_at_095": reached[0]["mode_entropy"] if reached else None,
        **sde,
        "curve": logger.curve,
    }


def add_parsers(sub) -> None:
    p = add_command(
        sub,
        "gym",
        cmd_gym,
        "train one method on the 2-D gym (a known optimum) and print its learning curve",
        "t2ialign gym --method grpo --budget-seconds 60 --json grpo.json\n"
        "  t2ialign gym --method nft --set lr=3e-4 --set iterations=50",
    )
    p.add_argument("--method", required=True, choices=list(METHOD_NAMES), help="the algorithm")
    p.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help="CPU seconds of training (default: the config's iterations)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a field of the method's config dataclass (repeatable)",
    )
    p.add_argument("--json", default=None, help="write the summary and the curve here")
    p.add_argument("--eval-every", type=float, default=5.0, help="CPU seconds between points of the curve")
    p.add_argument("--seed", type=int, default=0, help="seeds the base model's pre-training")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="steps of the base model's pre-training")
    p.add_argument(
        "--sde-a", type=float, default=0.7, help="Flow-GRPO's SDE noise scale a (sqrt(2) is memoryless)"
    )


def cmd_gym(args) -> int:
    import torch

    from t2ialign.gym import GymBackend, GymWorld, PretrainConfig, pretrain

    world = GymWorld()
    t0 = time.process_time()
    net = pretrain(world, PretrainConfig(steps=args.pretrain_steps, seed=args.seed))
    backend = GymBackend(net, world, sde_a=args.sde_a)
    print(
        f"base model pre-trained in {time.process_time() - t0:.1f} CPU s "
        f"(torch threads: {torch.get_num_threads()})"
    )
    res = run_gym(
        args.method,
        backend,
        args.set,
        budget_seconds=args.budget_seconds,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    print_table(
        ["cpu_s", "step", "success", "mode_entropy"],
        [
            [f"{r['seconds']:.1f}", r["step"], f"{r['success']:.3f}", f"{r['mode_entropy']:.3f}"]
            for r in res["curve"]
        ],
    )
    print(
        f"{args.method}: success {res['base_success']:.3f} -> {res['final_success']:.3f} "
        f"(target {res['target_success']:.3f}) in {res['seconds']:.1f} CPU s, {res['steps']} steps; "
        f"within-class mode entropy {res['base_mode_entropy']:.3f} -> {res['final_mode_entropy']:.3f}"
    )
    if "final_success_sde" in res:
        print(
            f"its own SDE chain ({res['config']['train_steps']} steps): success "
            f"{res['base_success_sde']:.3f} -> {res['final_success_sde']:.3f} "
            f"(target {res['target_success_sde']:.3f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
