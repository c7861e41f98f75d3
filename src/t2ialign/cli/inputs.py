"""What the sampling and training commands share: prompt files checked against the model that will
read them, and the generator a ``--model`` names."""

from __future__ import annotations

import sys
from pathlib import Path

LONG_PROMPTS = ("truncate", "error")


def add_long_prompts_arg(p) -> None:
    p.add_argument(
        "--long-prompts",
        choices=LONG_PROMPTS,
        default="truncate",
        help="a prompt longer than the text encoder takes (77 CLIP tokens for SD): truncate it to the "
        "encoder's limit with a warning (what diffusers does, the default) or stop with an error",
    )


def is_diffusers_folder(model: str | None, backend: str | None) -> bool:
    folder = Path(model) if model is not None else None
    return backend not in (None, "shapes") or (
        folder is not None
        and ((folder / "model_index.json").exists() or (folder / "pytorch_lora_weights.safetensors").exists())
    )


def load_sampler(model: str | None, backend: str | None, device: str, dtype: str):
    """The shipped shapes generator (``model`` None), a shapes generator folder, or a diffusers
    pipeline / LoRA run folder as a backend."""
    from t2ialign.models import load_generator

    if not is_diffusers_folder(model, backend):
        return load_generator(Path(model) if model is not None else None, device=device)
    from t2ialign.backends.loader import load_backend

    if model is None:
        raise ValueError(f"--backend {backend} needs --model PATH (a diffusers pipeline folder)")
    return load_backend(model, backend, device=device, dtype=dtype)


def check_prompts_for(pf, model, long_prompts: str = "truncate", file=None) -> None:
    """Check the rows of a :class:`~t2ialign.prompts.PromptFile` against the model that will read
    them: the embedded shapes generator reads prompts of its grammar only (free text is an error
    naming the line); a diffusers pipeline reads any text, and a prompt longer than one of its text
    encoders takes is truncated with a warning (``long_prompts='truncate'``) or is an error."""
    from t2ialign.prompts import needs_spec_error

    file = file if file is not None else sys.stderr
    if not hasattr(model, "overlong_prompts"):  # the shapes world's generator
        free = pf.free_text()
        if free:
            i = free[0]
            err = needs_spec_error("the embedded shapes generator", pf.rows[i]["prompt"], pf.where(i))
            raise ValueError(
                f"{err}; {len(free)} of {len(pf.rows)} prompts are free text. For free text, sample a "
                "diffusers pipeline: --model PIPELINE_FOLDER"
            )
        return
    line = {}
    for i, r in enumerate(pf.rows):
        line.setdefault(r["prompt"], pf.where(i))
    over = model.overlong_prompts([r["prompt"] for r in pf.rows])
    if not over:
        return
    first = over[0]
    if long_prompts == "error":
        raise ValueError(
            f"{line[first['prompt']]}: the prompt has {first['tokens']} tokens and the pipeline's "
            f"{first['tokenizer']} takes at most {first['limit']}; shorten it, or pass --long-prompts "
            f"truncate ({len(over)} such prompt(s)): {first['prompt']!r:.200}"
        )
    n = len({o["prompt"] for o in over})
    print(
        f"warning: {n} prompt(s) longer than the text encoder takes are truncated to its first tokens "
        "(--long-prompts error to refuse them):",
        file=file,
    )
    for o in over[:10]:
        print(
            f"  {line[o['prompt']]}: {o['tokens']} tokens > {o['limit']} ({o['tokenizer']}): "
            f"{o['prompt']!r:.120}",
            file=file,
        )
    if len(over) > 10:
        print(f"  ... and {len(over) - 10} more", file=file)
