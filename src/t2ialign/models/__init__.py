"""Models of the embedded world: the text-to-image flow model and the image-text encoder."""

from t2ialign.models.generator import (
    CheckpointError,
    Cond,
    Generator,
    GeneratorConfig,
    build_generator,
    load_generator,
    preset,
    save_generator,
)

__all__ = [
    "CheckpointError",
    "Cond",
    "Generator",
    "GeneratorConfig",
    "build_generator",
    "load_generator",
    "preset",
    "save_generator",
]
