"""``load_backend(path)``: a backend for a model folder, picked from what the folder holds.

- a diffusers pipeline folder (``model_index.json``): the backend of its ``_class_name``
  (StableDiffusionPipeline -> ``sd``, StableDiffusionXLPipeline -> ``sdxl``,
  StableDiffusion3Pipeline -> ``sd3``, FluxPipeline -> ``flux``), or the one ``backend`` forces;
- a folder of LoRA weights saved by a diffusers backend (``card.json`` of kind
  ``t2ialign-diffusers-lora``): its base pipeline with the LoRA fused in;
- a generator of the embedded shapes world (``card.json`` of kind ``t2ialign-generator``): a
  :class:`~t2ialign.backends.shapes.ShapesBackend`.

Everything is read from the local folder (``local_files_only``); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
PIPELINE_CLASS = {v: k for k, v in PIPELINES.items()}
BACKENDS = ("shapes", "sd", "sdxl", "sd3", "flux")
REQUIRED = {
    "sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
}
OPTIONAL = {"sd3": ("text_encoder_3", "tokenizer_3")}  # SD3 runs without T5 (zeros in its place)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _card(folder: Path) -> dict | None:
    path = folder / "card.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None


def _has_weights(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.bin")) or any(d.glob("*.safetensors.index.json"))


def parse_dtype(name: str) -> torch.dtype:
    """``--dtype NAME`` (float32, bf16, fp16, ...) as a torch dtype; a clear error for another name."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _dtype_kwarg() -> str:
    """``dtype`` in recent diffusers, ``torch_dtype`` (deprecated there) in older ones."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def check_pipeline_folder(folder: Path, family: str) -> dict:
    """Read ``model_index.json`` and check that every component ``family`` needs is there; returns
    the index. Raises ``ValueError`` naming what is missing."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ValueError(
            f"{folder}: not a diffusers pipeline folder, model_index.json is missing "
            "(nor is there a card.json of a t2ialign model)"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path}: not valid JSON ({e.msg})") from None
    names = list(REQUIRED[family]) + [n for n in OPTIONAL.get(family, ()) if (index.get(n) or [None])[0]]
    for name in names:
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise ValueError(f"{index_path}: no {name!r} component, which a {PIPELINE_CLASS[family]} needs")
        cls = entry[1]
        sub = folder / name
        if not sub.is_dir():
            raise ValueError(
                f"{folder}: the component folder {name!r} ({cls}) listed in model_index.json is missing"
            )
        if name == "scheduler":
            if not (sub / "scheduler_config.json").exists():
                raise ValueError(f"{sub}: scheduler_config.json is missing")
        elif name.startswith("tokenizer"):
            if not any(sub.iterdir()):
                raise ValueError(f"{sub}: the tokenizer folder is empty")
        else:
            if not (sub / "config.json").exists():
                raise ValueError(f"{sub}: config.json of the {name!r} component ({cls}) is missing")
            if not _has_weights(sub):
                raise ValueError(
                    f"{sub}: the weights of the {name!r} component ({cls}) are missing "
                    "(no .safetensors or .bin file)"
                )
    return index


def load_backend(
    path: str | Path,
    backend: str | None = None,
    *,
    device=None,
    dtype="float32",
    gradient_checkpointing: bool = False,
    resolution: int | None = None,
    **options,
):
    """A backend for the model in ``path`` (see the module docstring).

    ``backend`` forces the family (``shapes``, ``sd``, ``sdxl``, ``sd3``, ``flux``) instead of the
    one ``model_index.json`` names. ``dtype`` (``float32``, ``bfloat16``, ``float16`` or a torch
    dtype) is the storage dtype of the frozen weights; ``gradient_checkpointing`` applies to the
    denoiser; ``resolution`` is the image side in pixels (default: the pipeline's). Other
    ``options`` go to the backend (``eta``, ``timestep_spacing`` for sd/sdxl; ``sde_a``,
    ``max_sequence_length``, ``embedded_guidance`` for sd3/flux; ``cache_size``).
    """
    folder = Path(path).expanduser()
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not folder.exists():
        raise ValueError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder (a model is a diffusers pipeline folder or a t2ialign "
            "generator folder)"
        )
    card = _card(folder)
    kind = (card or {}).get("kind")
    if backend == "shapes" or (backend is None and kind == "t2ialign-generator"):
        from t2ialign.backends.shapes import ShapesBackend
        from t2ialign.models.generator import load_generator

        if options:
            raise ValueError(f"options {sorted(options)} do not apply to the shapes backend")
        return ShapesBackend(load_generator(folder, device=device or "cpu"))

    from t2ialign.backends.diffusers_backend import LORA_CARD_KIND

    if kind == LORA_CARD_KIND and not (folder / "model_index.json").exists():
        base = card.get("base_path")
        if not base:
            raise ValueError(f"{folder / 'card.json'}: a LoRA folder without base_path")
        if not any(folder.glob("*.safetensors")):
            raise ValueError(f"{folder}: the LoRA weights (pytorch_lora_weights.safetensors) are missing")
        be = load_backend(
            base,
            backend or card.get("backend"),
            device=device,
            dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
            resolution=resolution,
            **options,
        )
        be.load_lora(folder)
        be.model_id = str(folder)
        return be

    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise ValueError(
            f"{folder}: not a diffusers pipeline folder, model_index.json is missing "
            "(nor is there a card.json of a t2ialign model)"
        )
    class_name = json.loads(index_path.read_text()).get("_class_name")
    family = backend or PIPELINES.get(class_name)
    if family is None:
        raise ValueError(
            f"{index_path}: pipeline class {class_name!r} has no backend here (supported: "
            f"{', '.join(PIPELINES)}); force one with backend="
        )
    index = check_pipeline_folder(folder, family)

    import diffusers

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    kw = {_dtype_kwarg(): dtype, "local_files_only": True}
    if family == "sd":
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for name in OPTIONAL.get(family, ()):
        if not (index.get(name) or [None])[0]:
            kw[name] = None
    pipe = getattr(diffusers, PIPELINE_CLASS[family]).from_pretrained(str(folder), **kw)
    common = {
        "model_id": str(folder.resolve()),
        "device": device,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "resolution": resolution,
    }
    if family in ("sd", "sdxl"):
        from t2ialign.backends.diffusers_eps import EpsBackend

        return EpsBackend(pipe, family=family, **common, **options)
    from t2ialign.backends.diffusers_flow import FlowBackend

    return FlowBackend(pipe, family=family, **common, **options)
