"""The run every trainer shares: ranks, trainable parameters, optimiser, resume, logging, the
checkpoint cadence, the final save, and gradient accumulation.

A trainer's file holds its math and its step; the start and the finish are :class:`TrainingRun`::

    run = TrainingRun(backend, cfg, out, "rwr", accelerator=accelerator, logger=logger)
    run.start()                       # LoRA or full fine-tuning, AdamW, resume from ``out``
    for k in run.steps(cfg.steps, progress=progress):
        run.zero_grad()
        for part in run.micro_batches(batch_size):   # K parts of the batch (K = 1: the whole)
            run.backward(loss_of(part))              # each part's loss scaled by its share
        run.step()                                   # average over ranks, clip, AdamW
        run.record(row, k + 1)
        run.checkpoint(k + 1, extra={...})
    return run.finish()               # the final model, saved from the main process

**Gradient accumulation.** ``cfg.gradient_accumulation_steps = K`` splits each optimiser step's
batch into K micro-batches of equal size, each with its own forward and backward pass: the
gradients add up, so a method scales each micro-batch's loss by its share of the batch (for a mean,
``1 / K``), and K micro-batches of B / K give the step that one batch of B gives (the same draws,
the same update, up to float rounding), with a K-th of the activations in memory. The batch a
config names is the one optimiser step's batch whatever K is (Accelerate's and TRL's
``per_device_train_batch_size`` is the micro-batch; here it is ``batch_size / K``). Under
``accelerate launch`` the launcher's ``--gradient_accumulation_steps`` (or DeepSpeed's
``gradient_accumulation_steps``) is taken when the config leaves 1; two different values are an
error (:func:`resolve_accumulation`).

**Mixed precision.** The backends run their own autocast over frozen weights stored in ``--dtype``
(the trainable weights stay float32). The launcher's ``--mixed_precision`` is not applied on top;
it must agree with the backend's dtype (``no``, or the same half type), else
:func:`check_mixed_precision` stops the run before it starts.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from t2ialign.algorithms.common import (
    CHECKPOINT,
    RunLogger,
    load_trainer_state,
    make_optimizer,
    record_step,
    save_model,
    save_trainer_state,
    setup_trainable,
    truncate_log,
)
from t2ialign.algorithms.parallel import Ranks

MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Accelerate's ``mixed_precision`` names and the dtypes they mean."""


def check_accumulation(cfg, *batches: tuple[str, int]) -> None:
    """For a config's ``__post_init__``: ``gradient_accumulation_steps`` is at least 1 and divides
    every named batch size (``("batch_size", 32)``, ...; a size of 0 is a term that is off)."""
    k = cfg.gradient_accumulation_steps
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {k!r}")
    for name, n in batches:
        if n % k:
            raise ValueError(
                f"gradient_accumulation_steps={k} does not divide {name}={n}: the micro-batches of one "
                "step must be equal (the batch a config names is the step's, split into K parts)"
            )


def launcher_accumulation(accelerator) -> int:
    """The accumulation a launch asks for: DeepSpeed's ``gradient_accumulation_steps`` under
    DeepSpeed, else the accelerator's (``accelerate launch --gradient_accumulation_steps``); 1
    without an accelerator."""
    if accelerator is None:
        return 1
    if str(getattr(getattr(accelerator, "distributed_type", None), "value", "NO")) == "DEEPSPEED":
        config = dict(accelerator.state.deepspeed_plugin.deepspeed_config or {})
        steps = config.get("gradient_accumulation_steps", 1)
        return 1 if steps in (None, "auto") else int(steps)
    return int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)


def resolve_accumulation(steps: int, accelerator) -> int:
    """The accumulation to train with: the config's ``steps``, or the launch's when the config
    leaves 1; a clear error when both are set and differ (call it before any model loads)."""
    launch = launcher_accumulation(accelerator)
    if steps > 1 and launch > 1 and steps != launch:
        raise ValueError(
            f"gradient_accumulation_steps={steps} in the trainer's config, {launch} in the launch "
            "(accelerate launch --gradient_accumulation_steps or the DeepSpeed config): set one of "
            "them, or the same value in both"
        )
    return max(steps, launch)


def check_mixed_precision(accelerator, dtype: torch.dtype | None) -> None:
    """Refuse a launcher's ``--mixed_precision`` that disagrees with the backend's compute dtype
    ``dtype`` (the dtype of its frozen weights; None: the backend has no such setting and runs in
    float32)."""
    mode = str(getattr(accelerator, "mixed_precision", "no") or "no") if accelerator is not None else "no"
    if mode == "no":
        return
    if mode not in MIXED:
        raise ValueError(
            f"--mixed_precision {mode} is not supported by the t2ialign trainers (no, bf16, fp16)"
        )
    if dtype != MIXED[mode]:
        have = str(dtype).replace("torch.", "") if dtype is not None else "float32"
        raise ValueError(
            f"accelerate launch --mixed_precision {mode}, but the model's weights are {have}: the "
            "backends run their own autocast and are not cast again by the launcher. Load the model "
            f"with --dtype {str(MIXED[mode]).replace('torch.', '')} (float32 trainable weights under "
            "autocast), or launch with --mixed_precision no"
        )


class TrainingRun:
    """One fine-tuning run of ``backend`` by ``method`` into ``out``: see the module docstring.

    ``cfg`` is the method's config dataclass; the run reads its ``lr``, ``lora_rank``,
    ``lora_alpha``, ``grad_clip``, ``checkpoint_every``, ``gradient_accumulation_steps`` and
    (when it has one) ``weight_decay``. Creating the run builds :class:`Ranks` and checks the launch
    (accumulation, mixed precision), before any collective; :meth:`start` sets up the training."""

    def __init__(self, backend, cfg, out, method: str, accelerator=None, logger: RunLogger | None = None):
        self.backend, self.cfg, self.out, self.method = backend, cfg, Path(out), method
        self.ranks = Ranks(accelerator)
        self.accumulation = resolve_accumulation(cfg.gradient_accumulation_steps, accelerator)
        check_mixed_precision(accelerator, getattr(backend, "dtype", None))
        self.logger = logger
        self._own_logger = logger is None
        self.params: list[torch.nn.Parameter] = []
        self.opt = None
        self.first = 0  # the step (or iteration) this call starts from: 0, or the resumed one
        self.extra: dict = {}  # what the resumed checkpoint's method stored beside the weights
        self.rows: list[dict] = []
        self.bar = None
        self.total: int | None = None  # the last step, set by :meth:`steps`
        self.grad_norm = float("nan")

    # ---- start ---------------------------------------------------------------------------------

    def start(self) -> TrainingRun:
        """LoRA or full fine-tuning (``cfg.lora_rank``), the optimiser, resume from ``out`` (refusing
        another method's checkpoint; the log is cut back to the resumed step) and the logger."""
        cfg, ranks = self.cfg, self.ranks
        self.params = setup_trainable(self.backend, cfg.lora_rank, cfg.lora_alpha, ranks)
        decay = getattr(cfg, "weight_decay", 0.0)
        self.opt = make_optimizer(self.backend, self.params, ranks, cfg.lr, decay, cfg.grad_clip)
        path = self.out / CHECKPOINT
        if path.exists():  # look before loading: another method's weights may not even fit
            other = torch.load(path, weights_only=False, map_location="cpu", mmap=True).get("extra", {})
            if other.get("method") not in (None, self.method):
                raise ValueError(
                    f"{self.out} holds a {other['method']!r} run, not {self.method!r}: use another --out"
                )
        self.first, self.extra = load_trainer_state(self.out, self.backend, self.opt, ranks)
        if ranks.is_main:
            truncate_log(self.out, self.first)
            self.logger = self.logger or RunLogger(self.out, {"method": self.method, **asdict(cfg)})
        return self

    def steps(self, total: int, progress: bool = True, unit: str = "step"):
        """The steps (or iterations, rounds) from the resumed one to ``total``, with a progress bar
        on the main process."""
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(
            range(self.first, total),
            initial=self.first,
            total=total,
            desc=self.method,
            unit=unit,
            disable=not progress or not self.ranks.is_main,
        )
        return self.bar

    # ---- one optimiser step ----------------------------------------------------------------------

    def micro_batches(self, n: int, parts: int | None = None) -> list[slice]:
        """The contiguous micro-batches of a batch of ``n``: K of them (the run's accumulation), or
        ``parts`` (to split a second batch of the same step, such as the pre-training term's, into as
        many parts as the first). A batch that does not split evenly (the last minibatch of an
        epoch) gets parts whose sizes differ by at most one: scale each part's loss by
        ``len(part) / n``. Parts are never empty: a batch smaller than K has ``n`` parts."""
        k = min(self.accumulation if parts is None else parts, n) or 1
        if k == 1:
            return [slice(0, n)]
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Add ``loss``'s gradient (a micro-batch's, already scaled by its share) to the parameters'."""
        self.ranks.backward(loss)

    def step(self) -> float:
        """Average the accumulated gradients over ranks, clip at ``cfg.grad_clip``, take the AdamW step;
        returns the gradient norm before clipping."""
        self.grad_norm = self.ranks.step(self.opt, self.params, self.cfg.grad_clip)
        return self.grad_norm

    # ---- bookkeeping ---------------------------------------------------------------------------

    def record(self, row: dict[str, float], step: int, **postfix) -> None:
        """Log one step's row (stopping on a non-finite loss) and show ``postfix`` on the bar."""
        record_step(self.rows, row, step, self.ranks, self.out, self.logger)
        if self.bar is not None and postfix:
            self.bar.set_postfix(**postfix)

    def checkpoint(self, step: int, extra: dict | None = None) -> None:
        """Save a resumable state every ``cfg.checkpoint_every`` steps and at the last one, with the
        method's ``extra`` (tensors allowed: under FSDP they are gathered)."""
        if step % self.cfg.checkpoint_every and step != self.total:
            return
        extra = {"method": self.method, **(extra or {})}
        save_trainer_state(self.out, step, self.backend, self.opt, extra=extra, ranks=self.ranks)
        self.ranks.wait()

    def finish(self) -> list[dict]:
        """Close the logger the run opened and save the model to ``out`` (every process calls it);
        returns this call's log rows."""
        if self.ranks.is_main and self._own_logger and self.logger is not None:
            self.logger.close()
        save_model(self.backend, self.ranks, self.out, self.method, self.cfg)
        return self.rows
