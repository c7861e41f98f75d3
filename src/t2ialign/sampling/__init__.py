"""Samplers: pure step math in ``flow`` (and ``ddim`` for epsilon models), loops in ``sample``."""

from t2ialign.sampling.sample import generate_images, initial_noise, sample_backend, sample_ode, to_uint8

__all__ = ["generate_images", "initial_noise", "sample_backend", "sample_ode", "to_uint8"]
