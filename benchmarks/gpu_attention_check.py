"""Which SDPA kernel breaks bf16 LoRA gradients of a tiny FLUX on CUDA (issue 8).

Counts runs with non-finite LoRA gradients over 16 identical forward/backward passes of the tiny
FLUX pipeline of the tests, per SDPA kernel, then the bare ``scaled_dot_product_attention`` backward
per kernel at several head dimensions, then the first rows again with ``torch.empty`` filled with
NaN (deterministic mode). The first row ("as shipped") is the backend as it is now: since the fix it
turns cuDNN attention off below head dimension 64. Needs CUDA::

    python benchmarks/gpu_attention_check.py

Results in docs/RESULTS.md, "FLUX bf16 NaN on CUDA".
"""

import contextlib
import os
import sys

sys.path.insert(0, "tests")
os.environ["HF_HUB_OFFLINE"] = "1"
import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from diffusers_helpers import build_pipeline  # noqa: E402
from t2ialign.backends.loader import load_backend  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()
DEV = os.environ.get("DEV", "cuda")
W = "/tmp/fnan3"
build_pipeline("flux", f"{W}/flux")
OPT = {"max_sequence_length": 16, "resolution": 16}
PROMPTS = ["a red circle", "two blue squares"]


def backend():
    """The tiny FLUX in bf16 under autocast, LoRA rank 4 (float32 adapters)."""
    be = load_backend(f"{W}/flux", device=DEV, dtype="bfloat16", **OPT)
    be.enable_lora(4, 4.0)
    return be


def trial(be, n, tag, kernels=None):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *be.latent_shape, generator=g).to(DEV)  # no VAE
    eps = torch.randn(x0.shape, generator=g).to(DEV)
    s = torch.rand(2, generator=g).to(DEV)
    cond = be.encode(PROMPTS)
    try:
        run_trials(be, n, tag, kernels, x0, eps, s, cond)
    except RuntimeError as e:
        print(f"{tag:45s} unavailable {str(e)[:80]}", flush=True)


def run_trials(be, n, tag, kernels, x0, eps, s, cond):
    bad, big = 0, 0.0
    for _ in range(n):
        for p in be.trainable_parameters():
            p.grad = None
        x_s = be.add_noise(x0, eps, s)
        with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
            loss = (be.predict(x_s, s, cond) - be.target(x0, eps, s)).pow(2).mean()
        loss.backward()
        gs = [p.grad for p in be.trainable_parameters() if p.grad is not None]
        bad += any(not x.isfinite().all() for x in gs)
        big = max(big, max((float(x.abs().max()) for x in gs if x.isfinite().all()), default=0.0))
    print(f"{tag:45s} loss {loss.item():.6f} nonfinite-grad runs {bad}/{n} max|grad| {big:.3g}", flush=True)


NOCUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
be = backend()
trial(be, 16, "as shipped")
trial(be, 16, "cudnn only", [SDPBackend.CUDNN_ATTENTION])
trial(be, 16, "flash+efficient+math", NOCUDNN)
trial(be, 16, "efficient only", [SDPBackend.EFFICIENT_ATTENTION])
trial(be, 16, "math only", [SDPBackend.MATH])
# bare SDPA, FLUX-like layout (B, S, H, D) permuted to (B, H, S, D), random upstream gradient
for d, seq, heads in ((16, 32, 2), (128, 32, 2), (128, 1024, 24), (64, 77, 8)):
    for k in ("cudnn", "flash", "efficient", "math"):
        kb = {
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[k]
        bad, bigs = 0, []
        for i in range(16):
            g = torch.Generator(DEV).manual_seed(i)
            q, kk, v = (
                torch.randn(2, seq, heads, d, generator=g, device=DEV, dtype=torch.bfloat16).requires_grad_()
                for _ in range(3)
            )
            try:
                with sdpa_kernel([kb]):
                    o = torch.nn.functional.scaled_dot_product_attention(
                        *(t.permute(0, 2, 1, 3) for t in (q, kk, v))
                    )
                go = torch.randn(o.shape, generator=g, device=DEV, dtype=o.dtype)
                o.backward(go)
            except RuntimeError as e:
                bad = f"unavailable {str(e)[:60]}"
                break
            grads = torch.stack([t.grad.float().abs().max() for t in (q, kk, v)])
            bad += int(not grads.isfinite().all())
            bigs.append(float(grads[grads.isfinite()].max()) if grads.isfinite().any() else float("nan"))
        big = max(bigs) if bigs else None
        print(
            f"bare sdpa d={d} seq={seq} heads={heads} {k:9s} nonfinite {bad}/16 max|grad| {big}", flush=True
        )
torch.use_deterministic_algorithms(True, warn_only=True)
torch.utils.deterministic.fill_uninitialized_memory = True
trial(be, 8, "as shipped, NaN-filled empty()")
trial(be, 8, "flash+efficient+math, NaN-filled empty()", NOCUDNN)
trial(be, 8, "math only, NaN-filled empty()", [SDPBackend.MATH])
