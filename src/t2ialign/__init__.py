"""t2ialign: align text-to-image models with human feedback (Lee et al. 2023 and the online
methods that followed), end to end, on a CPU-sized embedded world or on diffusers models."""

__version__ = "0.1.0"
