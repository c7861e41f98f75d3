"""Shared helpers of the model and sampling tests: tiny models with non-trivial random weights."""

from __future__ import annotations

import contextlib

import torch

from t2ialign.models import Generator, build_generator
from t2ialign.models.encoder import DualEncoder, encoder_preset


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: the test machine's 2 cores are shared, and two torch threads
    fighting other jobs for them are several times slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_generator(seed: int = 0) -> Generator:
    """The ``tiny`` preset with its zero-initialised layers (the output convolution and each residual
    block's second convolution) filled with random values, so that the velocity depends on the
    input, the noise level and the prompt (an untrained model's velocity is identically zero)."""
    model = build_generator("tiny", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_encoder(seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    return DualEncoder(encoder_preset("tiny")).eval()


def record_prompts(backend) -> list[list[str]]:
    """Wrap ``backend.encode`` so that every call's prompts are appended to the returned list."""
    calls: list[list[str]] = []
    encode = backend.encode

    def recording(prompts):
        calls.append(list(prompts))
        return encode(prompts)

    backend.encode = recording
    return calls
