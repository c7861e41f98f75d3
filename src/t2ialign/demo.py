"""The end-to-end demo: the seed paper's loop on the embedded world, from the shipped base model.

seen-suite prompts -> generate -> simulated feedback (10% noise) -> reward model -> reward-weighted
fine-tuning (labelled + pseudo-labelled samples + the pre-training term) -> evaluation on the seen and
unseen suites, before and after -> ``report.html``, ``report.md``, ``results.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from t2ialign.algorithms.rwr import RWRConfig


@dataclass
class DemoConfig:
    out: str = "demo"
    """Output folder (the feedback project, the runs and the report go inside)."""
    model: str | None = None
    """Base generator folder (None: the shipped model)."""
    encoder: str | None = None
    """Image-text encoder folder (None: the shipped encoder)."""
    prompts_per_task: int = 16
    """Seen-suite prompts per task used for feedback (the suite has at most 16)."""
    feedback_per_prompt: int = 6
    """Images generated and labelled per prompt."""
    pseudo_per_prompt: int = 8
    """Unlabelled images per prompt scored by the reward model (0: none)."""
    eval_seen_per_prompt: int = 2
    eval_unseen_per_prompt: int = 4
    noise: float = 0.1
    """Error rate of the simulated rater."""
    reward_epochs: int = 300
    """Most epochs of reward-model training (it stops early on the validation split)."""
    rwr: RWRConfig | None = None
    """Fine-tuning settings (None: the demo's defaults)."""
    ablation: bool = False
    """Also run the paper's Table 3 (labelled only / + pseudo-labels / + pre-training term)."""
    sample_steps: int = 20
    guidance: float = 3.0
    seed: int = 0

    def __post_init__(self):
        if self.feedback_per_prompt < 1 or self.prompts_per_task < 1:
            raise ValueError("feedback_per_prompt and prompts_per_task must be at least 1")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if self.rwr is None:
            self.rwr = RWRConfig(
                steps=400,
                batch_size=32,
                pretrain_batch_size=32,
                beta=1.0,
                pseudo_fraction=0.5,
                lr=5e-5,
                checkpoint_every=100,
            )


def quick_config(**kw) -> DemoConfig:
    """``--quick``: a few prompts per task, few images, short training (about 3 minutes here)."""
    base = dict(
        prompts_per_task=3,
        feedback_per_prompt=3,
        pseudo_per_prompt=2,
        eval_seen_per_prompt=1,
        eval_unseen_per_prompt=1,
        reward_epochs=40,
        rwr=RWRConfig(steps=30, batch_size=16, pretrain_batch_size=16, lr=2e-4, checkpoint_every=10),
    )
    base.update(kw)
    return DemoConfig(**base)


def _subset(rows: list[dict], per_task: int) -> list[dict]:
    out, seen = [], {}
    for r in rows:
        if seen.get(r["task"], 0) < per_task:
            out.append(r)
            seen[r["task"]] = seen.get(r["task"], 0) + 1
    return out


class _Timer:
    def __init__(self):
        self.t0 = time.time()
        self.stages: dict[str, float] = {}
        self._last = self.t0

    def lap(self, name: str) -> None:
        now = time.time()
        self.stages[name] = round(now - self._last, 1)
        self._last = now
        print(f"[demo] {name}: {self.stages[name]:.0f} s (total {now - self.t0:.0f} s)", flush=True)


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the whole loop; returns the results dict also written to ``out/results.json``."""
    from t2ialign.backends import ShapesBackend
    from t2ialign.evaluation.evaluate import evaluate_generator, strip_arrays
    from t2ialign.evaluation.report import write_report
    from t2ialign.feedback import FeedbackStore
    from t2ialign.feedback.simulate import SimulatedRater, simulate
    from t2ialign.models import load_generator
    from t2ialign.models.encoder import load_encoder
    from t2ialign.pipeline import pseudo_labelled, rwr_data_from_store, world_pretrain_source
    from t2ialign.reward.rewards import ModelReward
    from t2ialign.reward.train import RewardTrainConfig, train_reward_model
    from t2ialign.sampling import generate_images
    from t2ialign.world.suites import suite

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new --out (the demo never overwrites)")
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    base = load_generator(cfg.model)
    encoder = load_encoder(cfg.encoder)
    seen = _subset(suite("seen"), cfg.prompts_per_task)
    unseen = _subset(suite("unseen"), cfg.prompts_per_task)

    # 1. collect feedback: generate, then the simulated rater labels (people: t2ialign label serve)
    store = FeedbackStore.create(out / "feedback", labels_per_image=1)
    rows = [r for r in seen for _ in range(cfg.feedback_per_prompt)]
    seeds = [cfg.seed + i for i in range(len(rows))]
    imgs = generate_images(
        base,
        [r["prompt"] for r in rows],
        seeds,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        progress=progress,
    )
    settings = {"steps": cfg.sample_steps, "guidance": cfg.guidance}
    store.add_generations(
        [
            {
                "image": im,
                "prompt": r["prompt"],
                "spec": r["spec"],
                "task": r["task"],
                "split": r["split"],
                "model_id": base.model_id,
                "seed": sd,
                "settings": settings,
            }
            for im, r, sd in zip(imgs, rows, seeds, strict=True)
        ]
    )
    sim = simulate(store, SimulatedRater("oracle", noise=cfg.noise, seed=cfg.seed), pairs=False)
    timer.lap(f"feedback: {len(rows)} images generated, {sim['labels']} simulated labels")

    # 2. learn a reward
    # the paper's head plus a skip connection from the zero-shot similarity (``cosine_skip``): with
    # this world's few feedback prompts the plain head overfits them at once (docs/RESULTS.md,
    # "Reward model"), while the skip variant keeps the auxiliary loss and ranks unseen prompts better
    reward_cfg = RewardTrainConfig(
        backbone_path=cfg.encoder, max_epochs=cfg.reward_epochs, seed=cfg.seed, cosine_skip=True
    )
    reward = train_reward_model(store, reward_cfg, out / "reward", progress=progress)
    reward_fn = ModelReward(reward)
    timer.lap("reward model trained")

    # 3. before: evaluate the base model
    ev = dict(
        steps=cfg.sample_steps, guidance=cfg.guidance, reward_fn=reward_fn, encoder=encoder, progress=progress
    )
    before = {
        "seen": evaluate_generator(base, seen, cfg.eval_seen_per_prompt, seed=900_000, **ev),
        "unseen": evaluate_generator(base, unseen, cfg.eval_unseen_per_prompt, seed=900_000, **ev),
    }
    timer.lap("evaluated the base model")

    # 4. fine-tune by reward-weighted likelihood
    labelled = rwr_data_from_store(store, weight="label")
    pseudo = None
    if cfg.pseudo_per_prompt > 0 and cfg.rwr.pseudo_fraction > 0:
        pseudo = pseudo_labelled(
            base,
            seen,
            cfg.pseudo_per_prompt,
            reward_fn,
            weight="filter",
            seed=500_000,
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            progress=progress,
        )
    pre = world_pretrain_source(seed=cfg.seed + 777, size=base.config.image_size)
    timer.lap("training data ready")

    def finetune(name: str, rcfg: RWRConfig):
        backend = ShapesBackend(load_generator(cfg.model))
        from t2ialign.algorithms.rwr import train_rwr

        rows_ = train_rwr(
            backend,
            rcfg,
            labelled,
            out / name,
            pseudo=pseudo if rcfg.pseudo_fraction > 0 else None,
            pretrain_source=pre,
            progress=progress,
        )
        return load_generator(out / name), rows_

    tuned, curve = finetune("rwr", cfg.rwr)
    timer.lap("fine-tuned")
    after = {
        "seen": evaluate_generator(tuned, seen, cfg.eval_seen_per_prompt, seed=900_000, **ev),
        "unseen": evaluate_generator(tuned, unseen, cfg.eval_unseen_per_prompt, seed=900_000, **ev),
    }
    timer.lap("evaluated the fine-tuned model")

    table3 = None
    if cfg.ablation:
        table3 = [
            {
                "training data": "base model",
                "fid": before["seen"]["fid"],
                "reward": before["seen"]["mean_reward"],
                "accuracy": before["seen"]["overall"],
                "n": before["seen"]["n"],
            }
        ]
        variants = [
            ("labelled images only", replace(cfg.rwr, beta=0.0, pseudo_fraction=0.0)),
            ("+ reward-scored unlabelled images", replace(cfg.rwr, beta=0.0)),
            ("+ pre-training loss", cfg.rwr),
        ]
        for i, (label, rcfg) in enumerate(variants):
            if rcfg is cfg.rwr:
                res = after["seen"]
            else:
                g, _ = finetune(f"ablation{i}", rcfg)
                res = evaluate_generator(g, seen, cfg.eval_seen_per_prompt, seed=900_000, **ev)
            table3.append(
                {
                    "training data": label,
                    "fid": res["fid"],
                    "reward": res["mean_reward"],
                    "accuracy": res["overall"],
                    "n": res["n"],
                }
            )
        timer.lap("ablation (Table 3)")

    results = {
        "before": {k: strip_arrays(v) for k, v in before.items()},
        "after": {k: strip_arrays(v) for k, v in after.items()},
        "table3": table3,
        "feedback": {
            "images": len(rows),
            "labels": sim["labels"],
            "good_rate": float(labelled.weights.mean()),
            "pseudo_images": len(pseudo) if pseudo is not None else 0,
            "pseudo_kept": float(pseudo.weights.mean()) if pseudo is not None else 0.0,
        },
        "reward_model": reward.card.get("metrics", {}),
        "config": _jsonable(asdict(cfg)),
        "base_model": base.model_id,
        "tuned_model": tuned.model_id,
        "stage_seconds": timer.stages,
        "wall_seconds": round(time.time() - timer.t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out, results, before, after, curve, reward_curve=reward.card.get("history"))
    timer.lap("report written")
    print(_closing_message(out))
    return results


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _closing_message(out: Path) -> str:
    proj = out / "feedback"
    return f"""
Done. Open {out / "report.html"} (or read {out / "report.md"}); numbers in {out / "results.json"}.

The labels here came from a simulated rater. To label by hand instead:
  t2ialign label add-annotator alice --project {proj}     # prints alice's login token
  t2ialign label serve --project {proj}                   # open http://127.0.0.1:8000
then retrain the reward and fine-tune from your labels:
  t2ialign reward train --project {proj} --out {out / "reward-human"}
  t2ialign finetune rwr --project {proj} --reward {out / "reward-human"} --out {out / "rwr-human"}
  t2ialign sample --model {out / "rwr-human"} --prompts seen.jsonl --out samples
  t2ialign eval --images samples
"""
