"""The end-to-end demo: the seed paper's loop on the embedded world, from the shipped base model.

seen-suite prompts -> generate -> simulated feedback (10% noise) -> reward model -> reward-weighted
fine-tuning (labelled + pseudo-labelled samples + the pre-training term) -> evaluation on the seen and
unseen suites, before and after -> ``report.html``, ``report.md``, ``results.json``.

With ``rounds`` > 1 the loop runs again from the tuned model (:mod:`t2ialign.loop`): new images
labelled, the reward retrained on every label so far, the tuned model fine-tuned again; ``resume``
continues a demo whose run was killed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from t2ialign.algorithms.nft_labelled import LabelledNFTConfig
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
    method: str = "rwr"
    """How the labelled images fine-tune the model: ``rwr`` (the seed paper's reward-weighted
    likelihood, with pseudo-labels and the pre-training term) or ``nft-labelled`` (DiffusionNFT's loss
    on the good and the bad labelled images, :mod:`t2ialign.algorithms.nft_labelled`; no pseudo-labels,
    no ablation)."""
    rwr: RWRConfig | None = None
    """RWR's settings (None: the demo's defaults)."""
    nft: LabelledNFTConfig | None = None
    """``method="nft-labelled"``: its settings (None: the demo's defaults)."""
    ablation: bool = False
    """Also run the paper's Table 3 (labelled only / + pseudo-labels / + pre-training term), on one
    round's data."""
    ceiling: str | None = None
    """A generator pre-trained on exact captions (the world's ceiling), added as a row of Table 3."""
    rounds: int = 1
    """Relabelling rounds (:mod:`t2ialign.loop`): each round after the first labels new images of the
    previous round's model, retrains the reward on every label so far and fine-tunes that model."""
    select: str = "random"
    """Which images a round sends to be labelled: ``random`` or ``uncertain`` (active learning: of
    ``pool_factor`` times as many, those the previous round's reward is least sure of)."""
    pool_factor: int = 3
    """``select="uncertain"``: images generated per image sent."""
    sample_steps: int = 20
    guidance: float = 3.0
    """Classifier-free guidance of the evaluation (the model as a user samples it)."""
    train_guidance: float = 3.0
    """Guidance of the images drawn to be labelled and pseudo-labelled: the images the model is
    fine-tuned on (3, the evaluation's, by default). With beta 0, fitting the model to its own
    guidance-3 samples compounds guidance and drifts (counting 0.507 -> 0.285 on checker labels,
    against 0.528 at guidance 1); in the demo, whose pre-training term holds the drift, guidance 1
    did not help (seen 0.445 -> 0.401, unseen 0.270 -> 0.283, FID 78 -> 92, against 0.434, 0.230
    and 75 at 3; docs/RESULTS.md, "The demo with guidance-1 training images")."""
    seed: int = 0

    def __post_init__(self):
        if self.feedback_per_prompt < 1 or self.prompts_per_task < 1:
            raise ValueError("feedback_per_prompt and prompts_per_task must be at least 1")
        if self.guidance <= 0 or self.train_guidance <= 0:
            raise ValueError(
                f"guidance and train_guidance must be positive, got {self.guidance}, {self.train_guidance}"
            )
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        from t2ialign.loop import SELECT

        if self.select not in SELECT:
            raise ValueError(f"select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.rounds < 1 or self.pool_factor < 1:
            raise ValueError(
                f"rounds and pool_factor must be at least 1, got {self.rounds}, {self.pool_factor}"
            )
        if self.method not in ("rwr", "nft-labelled"):
            raise ValueError(f"method must be 'rwr' or 'nft-labelled', got {self.method!r}")
        if self.ablation and self.method != "rwr":
            raise ValueError("the ablation (the paper's Table 3) is RWR's; use it with method rwr")
        if self.ablation and self.rounds != 1:
            raise ValueError("the ablation (the paper's Table 3) is one round's; use it with rounds 1")
        if self.ceiling is not None and not self.ablation:
            raise ValueError("ceiling is a row of the ablation's Table 3; set ablation too")
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
        if self.nft is None:
            self.nft = LabelledNFTConfig(
                steps=300, batch_size=32, beta=0.3, adv_clip=1.0, lr=3e-5, checkpoint_every=100
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
        nft=LabelledNFTConfig(steps=30, batch_size=16, beta=0.3, adv_clip=1.0, lr=1e-4, checkpoint_every=10),
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


def _prepare_out(out: Path, cfg: DemoConfig, resume: bool) -> None:
    """A new demo needs an empty folder (the demo never overwrites); ``resume`` continues the demo
    in ``out``, whose saved settings must be this run's (``rounds`` may grow: more rounds)."""
    saved_path = out / "demo_config.json"
    mine = _jsonable(asdict(cfg))
    if resume:
        if not saved_path.exists():
            raise FileNotFoundError(f"{out} holds no demo to resume (no demo_config.json)")
        saved = json.loads(saved_path.read_text())
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v and k != "rounds"}
        if diff:
            raise ValueError(
                f"{out} was started with other settings {diff} (saved, asked); use another --out"
            )
        if mine["rounds"] < saved["rounds"]:
            raise ValueError(f"{out} was started with {saved['rounds']} rounds; --rounds cannot shrink")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty; choose a new --out (the demo never overwrites), or --resume to continue it"
        )
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(mine, indent=1))


def _round_dir(out: Path, r: int) -> Path:
    """Round 1 writes where a one-round demo always did (``out/reward``, ``out/rwr``); round r > 1
    inside ``out/round{r}``."""
    return out if r == 1 else out / f"round{r}"


def _round_record(r: int, fb: dict, labelled, reward, after: dict, model_dir: Path) -> dict:
    from t2ialign.evaluation.evaluate import strip_arrays

    seen, unseen = strip_arrays(after["seen"]), strip_arrays(after["unseen"])
    return {
        "round": r,
        "feedback": fb,
        "labelled_images": len(labelled),
        "good_rate": float(labelled.weights.mean()),
        "reward_model": reward.card.get("metrics", {}),
        "seen": seen["overall"],
        "seen_ci95": seen.get("splits", {}).get("seen", {}).get("ci95"),
        "seen_n": seen["n"],
        "unseen": unseen["overall"],
        "unseen_n": unseen["n"],
        "fid_seen": seen["fid"],
        "fid_unseen": unseen["fid"],
        "seen_tasks": {t: v["accuracy"] for t, v in seen["tasks"].items()},
        "model": str(model_dir),
    }


def run_demo(cfg: DemoConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run the whole loop; returns the results dict also written to ``out/results.json``.
    ``resume``: continue the demo in ``cfg.out`` (finished rounds are kept, a killed one resumes)."""
    from t2ialign.evaluation.evaluate import evaluate_generator, strip_arrays
    from t2ialign.evaluation.report import write_report
    from t2ialign.feedback import FeedbackStore
    from t2ialign.feedback.simulate import SimulatedRater
    from t2ialign.loop import collect_feedback
    from t2ialign.models import load_generator
    from t2ialign.models.encoder import load_encoder
    from t2ialign.pipeline import pseudo_labelled, rwr_data_from_store, world_pretrain_source
    from t2ialign.reward.rewards import ModelReward
    from t2ialign.reward.train import RewardTrainConfig, train_reward_model
    from t2ialign.world.suites import suite

    out = Path(cfg.out)
    _prepare_out(out, cfg, resume)
    timer = _Timer()
    base = load_generator(cfg.model)
    encoder = load_encoder(cfg.encoder)
    seen = _subset(suite("seen"), cfg.prompts_per_task)
    unseen = _subset(suite("unseen"), cfg.prompts_per_task)
    store = FeedbackStore.open(out / "feedback", create=True)
    rater = SimulatedRater("oracle", noise=cfg.noise, seed=cfg.seed)
    # the paper's head plus a skip connection from the zero-shot similarity (``cosine_skip``): with
    # this world's few feedback prompts the plain head overfits them at once (docs/RESULTS.md,
    # "Reward model"), while the skip variant keeps the auxiliary loss and ranks unseen prompts better
    reward_cfg = RewardTrainConfig(
        backbone_path=cfg.encoder, max_epochs=cfg.reward_epochs, seed=cfg.seed, cosine_skip=True
    )

    def evaluate(model, reward_fn):
        ev = dict(
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            reward_fn=reward_fn,
            encoder=encoder,
            progress=progress,
        )
        return {
            "seen": evaluate_generator(model, seen, cfg.eval_seen_per_prompt, seed=900_000, **ev),
            "unseen": evaluate_generator(model, unseen, cfg.eval_unseen_per_prompt, seed=900_000, **ev),
        }

    current, current_dir = base, cfg.model
    rounds, before, after, curve = [], None, None, []
    first_reward = reward = labelled = pseudo = pre = None
    for r in range(1, cfg.rounds + 1):
        rdir = _round_dir(out, r)
        done = rdir / "round.json" if r > 1 else out / "round1.json"
        if done.exists():  # a finished round of a resumed demo
            rounds.append(json.loads(done.read_text()))
            current_dir = rounds[-1]["model"]
            current = load_generator(current_dir)
            reward = _load_reward(rdir / "reward")  # the next round chooses its images with it
            first_reward = reward if first_reward is None else first_reward
            continue
        offset = (r - 1) * 10_000_000  # every round's images have seeds of their own

        # 1. collect feedback: generate from the current model, then label (people: label serve)
        fb = collect_feedback(
            current,
            seen,
            cfg.feedback_per_prompt,
            store,
            rater,
            seed=cfg.seed + offset,
            steps=cfg.sample_steps,
            guidance=cfg.train_guidance,
            select=cfg.select,
            pool_factor=cfg.pool_factor,
            reward_fn=ModelReward(reward) if reward is not None else None,
            threshold=reward.card.get("metrics", {}).get("threshold", 0.5) if reward is not None else 0.5,
            progress=progress,
        )
        timer.lap(f"round {r} feedback: {fb['sent']} images sent of {fb['generated']}, {fb['labels']} labels")

        # 2. learn a reward from every label so far
        reward = train_reward_model(store, reward_cfg, rdir / "reward", progress=progress)
        first_reward = reward if first_reward is None else first_reward
        timer.lap(f"round {r} reward model trained")
        yardstick = ModelReward(first_reward)  # every round's mean reward on round 1's reward

        # 3. before: evaluate the base model (once)
        if before is None:
            before = evaluate(base, yardstick)
            timer.lap("evaluated the base model")

        # 4. fine-tune the current model by reward-weighted likelihood
        labelled = rwr_data_from_store(store, weight="label")
        pseudo = None
        if cfg.method == "rwr" and cfg.pseudo_per_prompt > 0 and cfg.rwr.pseudo_fraction > 0:
            pseudo = pseudo_labelled(
                current,
                seen,
                cfg.pseudo_per_prompt,
                ModelReward(reward),
                weight="filter",
                seed=500_000 + offset,
                steps=cfg.sample_steps,
                guidance=cfg.train_guidance,
                progress=progress,
            )
        pre = world_pretrain_source(seed=cfg.seed + 777 + (r - 1) * 1000, size=base.config.image_size)
        timer.lap(f"round {r} training data ready")
        tuned_dir = rdir / "rwr"
        tcfg = cfg.rwr if cfg.method == "rwr" else cfg.nft
        curve = _finetune(current_dir, tcfg, labelled, pseudo, pre, tuned_dir, progress)
        current, current_dir = load_generator(tuned_dir), tuned_dir
        timer.lap(f"round {r} fine-tuned")
        after = evaluate(current, yardstick)
        timer.lap(f"round {r} evaluated the fine-tuned model")
        rounds.append(_round_record(r, fb, labelled, reward, after, tuned_dir))
        done.write_text(json.dumps(_jsonable(rounds[-1]), indent=1))

    # a resumed demo whose rounds were all done: evaluate again (deterministic) for the report
    if first_reward is None:
        first_reward = _load_reward(out / "reward")
    if reward is None:
        reward = _load_reward(_round_dir(out, cfg.rounds) / "reward")
    yardstick = ModelReward(first_reward)
    if before is None:
        before = evaluate(base, yardstick)
    if after is None:
        after = evaluate(current, yardstick)
    if not curve:
        from t2ialign.algorithms.common import read_log

        curve = read_log(Path(current_dir))

    table3 = None
    if cfg.ablation:  # one round (checked in DemoConfig): round 1's labels, pseudo-labels and reward
        if labelled is None:
            labelled = rwr_data_from_store(store, weight="label")
        if pseudo is None and cfg.pseudo_per_prompt > 0 and cfg.rwr.pseudo_fraction > 0:
            pseudo = pseudo_labelled(
                base,
                seen,
                cfg.pseudo_per_prompt,
                ModelReward(first_reward),
                weight="filter",
                seed=500_000,
                steps=cfg.sample_steps,
                guidance=cfg.train_guidance,
                progress=progress,
            )
        if pre is None:
            pre = world_pretrain_source(seed=cfg.seed + 777, size=base.config.image_size)

        def row(label, res):
            return {
                "training data": label,
                "fid": res["fid"],
                "reward": res["mean_reward"],
                "accuracy": res["overall"],
                "n": res["n"],
            }

        table3 = [row("base model", before["seen"])]
        variants = [
            ("labelled images only", replace(cfg.rwr, beta=0.0, pseudo_fraction=0.0)),
            ("+ reward-scored unlabelled images", replace(cfg.rwr, beta=0.0)),
        ]
        for i, (label, rcfg) in enumerate(variants):
            _finetune(cfg.model, rcfg, labelled, pseudo, pre, out / f"ablation{i}", progress)
            g = load_generator(out / f"ablation{i}")
            table3.append(row(label, evaluate(g, yardstick)["seen"]))
        table3.append(row("+ pre-training loss", after["seen"]))  # the demo's own run
        if cfg.ceiling:
            ceiling = evaluate(load_generator(cfg.ceiling), yardstick)["seen"]
            table3.append(row("ceiling: pre-trained on exact captions", ceiling))
        timer.lap("ablation (Table 3)")

    last = rounds[-1]
    results = {
        "before": {k: strip_arrays(v) for k, v in before.items()},
        "after": {k: strip_arrays(v) for k, v in after.items()},
        "rounds": rounds,
        "table3": table3,
        "feedback": {
            "images": last["labelled_images"],  # every round's, one simulated label each
            "labels": last["labelled_images"],
            "good_rate": last["good_rate"],
            "pseudo_images": len(pseudo) if pseudo is not None else 0,
            "pseudo_kept": float(pseudo.weights.mean()) if pseudo is not None else 0.0,
        },
        "reward_model": last["reward_model"],
        "config": _jsonable(asdict(cfg)),
        "base_model": base.model_id,
        "tuned_model": current.model_id,
        "stage_seconds": timer.stages,
        "wall_seconds": round(time.time() - timer.t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out, results, before, after, curve, reward_curve=reward.card.get("history"))
    timer.lap("report written")
    print(_closing_message(out))
    return results


def _finetune(model_dir, rcfg, labelled, pseudo, pre, out: Path, progress: bool) -> list[dict]:
    """Fine-tuning of the generator in ``model_dir`` into ``out`` (resumes there): reward-weighted
    likelihood for an :class:`RWRConfig`, labelled NFT for a :class:`LabelledNFTConfig`."""
    from t2ialign.algorithms.nft_labelled import train_nft_labelled
    from t2ialign.algorithms.rwr import train_rwr
    from t2ialign.backends import ShapesBackend
    from t2ialign.models import load_generator

    backend = ShapesBackend(load_generator(model_dir))
    if isinstance(rcfg, LabelledNFTConfig):
        return train_nft_labelled(backend, rcfg, labelled, out, pretrain_source=pre, progress=progress)
    return train_rwr(
        backend,
        rcfg,
        labelled,
        out,
        pseudo=pseudo if rcfg.pseudo_fraction > 0 else None,
        pretrain_source=pre,
        progress=progress,
    )


def _load_reward(path: Path):
    from t2ialign.reward.model import load_reward_model

    return load_reward_model(path)


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
