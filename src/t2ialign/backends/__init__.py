"""Model backends: the interface algorithms use (``base``), the embedded world's model (``shapes``)
and diffusers pipelines."""

from t2ialign.backends.base import Backend, denoising_loss
from t2ialign.backends.shapes import ShapesBackend

__all__ = ["Backend", "ShapesBackend", "denoising_loss"]
