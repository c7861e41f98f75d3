"""At which attention head dimensions does an SDPA kernel's backward go wrong on this GPU? (issue 8)

For each head dimension, sequence length and dtype: ``scaled_dot_product_attention`` on (B, S, H, D)
tensors permuted to (B, H, S, D) (diffusers' layout), a random upstream gradient, 16 seeds; a seed is
bad when a gradient is not finite or larger than 1e4 (the garbage seen was about 1e37). Before each
seed, freed GPU memory is filled with 0xFF bytes (NaN in bf16), so that a kernel that reads memory it
never wrote reads NaN instead of the zeros of fresh memory. cuDNN is compared with the
memory-efficient kernel. Needs CUDA; prints one line per case::

    python benchmarks/gpu_sdpa_head_dims.py

Results in docs/RESULTS.md, "FLUX bf16 NaN on CUDA".
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def poison() -> None:
    """Fill freed blocks of the caching allocator (small and large pools) with 0xFF bytes."""
    blocks = [torch.empty(1 << 18, dtype=torch.uint8, device="cuda") for _ in range(64)]
    blocks += [torch.empty(1 << 25, dtype=torch.uint8, device="cuda") for _ in range(4)]
    for b in blocks:
        b.fill_(255)
    del blocks


KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), torch.cuda.get_device_name(0))
for dtype in (torch.bfloat16,):
    for d in (16, 32, 40, 48, 64, 80, 128, 160):
        for seq in (32, 77, 1024):
            line = []
            for name, kernel in KERNELS.items():
                bad = 0
                for i in range(16):
                    poison()
                    g = torch.Generator("cuda").manual_seed(i)
                    q, k, v = (
                        torch.randn(2, seq, 2, d, generator=g, device="cuda", dtype=dtype).requires_grad_()
                        for _ in range(3)
                    )
                    try:
                        with sdpa_kernel([kernel]):
                            o = torch.nn.functional.scaled_dot_product_attention(
                                *(t.permute(0, 2, 1, 3) for t in (q, k, v))
                            )
                        o.backward(torch.randn(o.shape, generator=g, device="cuda", dtype=dtype))
                    except RuntimeError:
                        bad = "n/a"
                        break
                    m = torch.stack([t.grad.float().abs().max() for t in (q, k, v)])
                    bad += int(not (m.isfinite().all() and m.max() < 1e4))
                line.append(f"{name} {bad}/16" if bad != "n/a" else f"{name} n/a")
            print(f"{str(dtype)[6:]:8s} d={d:3d} seq={seq:4d} " + "  ".join(line), flush=True)
