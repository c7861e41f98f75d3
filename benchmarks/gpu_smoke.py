"""GPU smoke check of the diffusers backends (issue 8): bf16 + autocast + gradient checkpointing on
CUDA, one iteration of each trainer per family on tiny random pipelines built from config (no
download), the saved LoRA in a plain pipeline on CUDA, and the fp32 chain against diffusers' own
pipeline on CUDA. Writes ``$OUT/gpu_check.json`` and prints ALL_OK or SOME_FAILED.

::

    OUT=/tmp python benchmarks/gpu_smoke.py                  # on a machine with CUDA
    SDPA=MATH OUT=/tmp python benchmarks/gpu_smoke.py        # attention through these SDPA kernels only

Result (2026-11-26, H100, torch 2.11 + CUDA 13): ALL_OK, every family finite in bf16. FLUX's
NaN training losses came from cuDNN's attention backward at the tiny models' head dimension (16);
the flow backend now turns cuDNN attention off below head dimension 64 (docs/RESULTS.md, "FLUX
bf16 NaN on CUDA"; the kernel-by-kernel check is ``benchmarks/gpu_attention_check.py``).
"""

import json
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ["HF_HUB_OFFLINE"] = "1"
import torch  # noqa: E402

from diffusers_helpers import FAMILIES, brightness_reward, build_pipeline  # noqa: E402
from t2ialign.backends.loader import PIPELINE_CLASS, load_backend  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
WORK = tempfile.mkdtemp(prefix="gpu_smoke_")  # fresh pipelines and run folders (no resume)
if os.environ.get("SDPA"):  # e.g. SDPA=MATH or SDPA=FLASH_ATTENTION,EFFICIENT_ATTENTION,MATH
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = [getattr(SDPBackend, k) for k in os.environ["SDPA"].split(",")]
    sdpa_kernel(kernels).__enter__()  # for the whole run
DEV = os.environ.get("DEV", "cuda")
OPTS = {"sd3": {"max_sequence_length": 16}, "flux": {"max_sequence_length": 16, "resolution": 16}}
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]
results = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__}


def run(name, fn):
    t = time.time()
    try:
        info = fn()
        results[name] = {"ok": True, "s": round(time.time() - t, 2), **(info or {})}
    except Exception as e:  # report and go on
        results[name] = {"ok": False, "error": repr(e)[:500], "tb": traceback.format_exc()[-1500:]}
    print(name, results[name], flush=True)


for fam in FAMILIES:
    folder = f"{WORK}/pipes/{fam}"
    build_pipeline(fam, folder)

    def online(fam=fam, folder=folder):
        import diffusers

        be = load_backend(
            folder, device=DEV, dtype="bfloat16", gradient_checkpointing=True, **OPTS.get(fam, {})
        )
        out = f"{WORK}/runs/{fam}-online"
        rows = [{"prompt": p} for p in PROMPTS]
        if fam in ("sd", "sdxl"):
            from t2ialign.algorithms.ddpo import DDPOConfig, train_ddpo

            cfg = DDPOConfig(
                iterations=2,
                batch_size=4,
                train_steps=3,
                guidance=3.0,
                minibatch_size=2,
                lr=1e-2,
                lora_rank=4,
                lora_alpha=4,
            )
            log = train_ddpo(be, brightness_reward, rows, cfg, out, progress=False)
        else:
            from t2ialign.algorithms.grpo import GRPOConfig, train_grpo

            cfg = GRPOConfig(
                iterations=2,
                prompts_per_iter=2,
                group_size=2,
                train_steps=3,
                guidance=3.0,
                beta=0.04,
                minibatch_size=2,
                lr=1e-2,
                lora_rank=4,
                lora_alpha=8,
            )
            log = train_grpo(be, brightness_reward, rows, cfg, out, progress=False)
        pipe = getattr(diffusers, PIPELINE_CLASS[fam]).from_pretrained(folder).to(DEV)
        pipe.set_progress_bar_config(disable=True)
        kw = {"max_sequence_length": 16} if fam in ("sd3", "flux") else {}

        def img():
            return pipe(
                PROMPTS[:1],
                height=16,
                width=16,
                num_inference_steps=2,
                output_type="pt",
                generator=torch.Generator(DEV).manual_seed(0),
                **kw,
            ).images

        a = img()
        pipe.load_lora_weights(out)
        b = img()
        return {
            "rows": [{k: round(v, 5) for k, v in r.items() if isinstance(v, float)} for r in log],
            "lora_change": float((a - b).abs().max()),
            "lora_dtypes": sorted({str(p.dtype) for p in be.trainable_parameters()}),
        }

    def offline(fam=fam, folder=folder):
        from t2ialign.algorithms.dpo import DPOConfig, PairSamples, train_dpo
        from t2ialign.algorithms.rwr import RWRConfig, WeightedSamples, train_rwr

        be = load_backend(folder, device=DEV, dtype="bfloat16", **OPTS.get(fam, {}))
        imgs = torch.rand(4, 3, 16, 16)
        r = train_rwr(
            be,
            RWRConfig(steps=2, batch_size=2, pretrain_batch_size=0, beta=0.0, lora_rank=4),
            WeightedSamples(imgs[:2], PROMPTS[:2], torch.ones(2)),
            f"{WORK}/runs/{fam}-rwr",
            progress=False,
        )
        be = load_backend(folder, device=DEV, dtype="bfloat16", **OPTS.get(fam, {}))
        d = train_dpo(
            be,
            PairSamples(imgs[:2], imgs[2:], PROMPTS[:2]),
            DPOConfig(steps=2, batch_size=2, lora_rank=4),
            f"{WORK}/runs/{fam}-dpo",
            progress=False,
        )
        return {"rwr_loss": r[-1]["loss"], "dpo_loss": d[-1]["loss"]}

    def chain(fam=fam, folder=folder):
        import diffusers
        from diffusers import DDIMScheduler, FluxPipeline

        be = load_backend(folder, device=DEV, **OPTS.get(fam, {}))
        pipe = getattr(diffusers, PIPELINE_CLASS[fam]).from_pretrained(folder).to(DEV)
        pipe.set_progress_bar_config(disable=True)
        if fam in ("sd", "sdxl"):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        x1 = torch.randn(1, *be.latent_shape, device=DEV)
        with torch.no_grad():
            cond, grid, x = be.encode(PROMPTS[:1]), be.timesteps(4), x1
            for k in range(4):
                x = be.ode_step(be.predict(x, grid[k], cond, guidance=2.5), grid[k], grid[k + 1], x)
            lat = FluxPipeline._pack_latents(x1, 1, *x1.shape[1:]) if fam == "flux" else x1
            kw = {"max_sequence_length": 16} if fam in ("sd3", "flux") else {}
            ref = pipe(
                PROMPTS[:1],
                height=16,
                width=16,
                num_inference_steps=4,
                guidance_scale=2.5,
                latents=lat,
                output_type="latent",
                **kw,
            ).images
        if fam == "flux":
            ref = FluxPipeline._unpack_latents(ref, 16, 16, be.vae_scale_factor)
        return {"max_abs_diff": float((x - ref.float()).abs().max())}

    run(f"{fam}/online_bf16_ckpt", online)
    run(f"{fam}/rwr_dpo_bf16", offline)
    run(f"{fam}/chain_fp32", chain)


def nft():
    from t2ialign.algorithms.nft import NFTConfig, train_nft

    be = load_backend(f"{WORK}/pipes/sd3", device=DEV, dtype="bfloat16", **OPTS["sd3"])
    cfg = NFTConfig(
        iterations=2,
        prompts_per_iter=2,
        group_size=2,
        sample_steps=3,
        train_batch_size=2,
        lora_rank=4,
        kl_weight=1e-4,
    )
    log = train_nft(
        be, brightness_reward, [{"prompt": p} for p in PROMPTS], cfg, f"{WORK}/runs/nft", progress=False
    )
    return {"loss": log[-1]["loss"]}


run("sd3/nft_bf16", nft)
json.dump(results, open(os.path.join(OUT, "gpu_check.json"), "w"), indent=1)
print("ALL_OK" if all(v.get("ok", True) for v in results.values() if isinstance(v, dict)) else "SOME_FAILED")
