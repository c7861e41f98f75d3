"""Tiny random diffusers pipelines built from config (no download), as diffusers' own tests build
their dummy components: SD 1.5, SDXL, SD3 and FLUX, with tokenizers made from a small local
vocabulary. ``build_pipeline(family, folder)`` writes a pipeline folder that ``load_backend`` reads.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

FAMILIES = ("sd", "sdxl", "sd3", "flux")
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "two",
    "three",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "circle",
    "square",
    "triangle",
    "dog",
    "cat",
    "photo",
    "bright",
    "dark",
    "on",
    "background",
]
CHARS = list(string.ascii_lowercase + string.digits + ".,!?'-")
MAX_LEN = 16  # CLIP and T5 sequence length of the tiny tokenizers


def clip_tokenizer(folder: Path):
    """A CLIPTokenizer from a vocab.json + merges.txt written here: every character, plus merges that
    spell out the words of ``WORDS`` (bos 0, eos = pad 1)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    for c in CHARS:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for w in WORDS:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            pair = f"{toks[0]} {toks[1]}"
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(toks[0] + toks[1], len(vocab))
            toks = [toks[0] + toks[1]] + toks[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LEN)


def t5_tokenizer():
    """A sentencepiece-free stand-in for T5's tokenizer: word-level, lower-cased, ``</s>`` appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS + CHARS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_LEN
    )


def clip_config(hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=200,
        max_position_embeddings=MAX_LEN,
        hidden_act="gelu",
        projection_dim=projection,
    )


def save_tiny_clip(folder: Path, tokenizer, max_positions: int = 16, projection: int = 16) -> Path:
    """A tiny random ``CLIPModel`` (16 px images, 16-d layers) saved with ``tokenizer`` in ``folder``."""
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=max_positions,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=projection,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=100,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def tiny_vae(latent_channels: int, flow: bool):
    from diffusers import AutoencoderKL

    if flow:  # SD3 / FLUX style: no quant convs, shift factor
        return AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4, 8),
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
    )


def build_pipeline(family: str, folder: str | Path, seed: int = 0):
    """Build the tiny random pipeline of ``family`` and ``save_pretrained`` it to ``folder``; returns
    the pipeline. Images are 16 x 16 pixels (latents 8 x 8; VAE downsampling 2)."""
    import diffusers as d
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tok_dir = folder.parent / f"_{folder.name}_vocab"
    if family == "sd":
        unet = d.UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            norm_num_groups=4,
            attention_head_dim=4,
        )
        sched = d.DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = d.StableDiffusionPipeline(
            vae=tiny_vae(4, flow=False),
            text_encoder=CLIPTextModel(clip_config()),
            tokenizer=clip_tokenizer(tok_dir),
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        unet = d.UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64,
            norm_num_groups=4,
        )
        sched = d.EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        sched.register_to_config(clip_sample=False, set_alpha_to_one=False)  # as SDXL's own config
        pipe = d.StableDiffusionXLPipeline(
            vae=tiny_vae(4, flow=False),
            text_encoder=CLIPTextModel(clip_config()),
            text_encoder_2=CLIPTextModelWithProjection(clip_config()),
            tokenizer=clip_tokenizer(tok_dir),
            tokenizer_2=clip_tokenizer(tok_dir),
            unet=unet,
            scheduler=sched,
            force_zeros_for_empty_prompt=True,
        )
    elif family == "sd3":
        transformer = d.SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        pipe = d.StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(4, flow=True),
            text_encoder=CLIPTextModelWithProjection(clip_config()),
            tokenizer=clip_tokenizer(tok_dir),
            text_encoder_2=CLIPTextModelWithProjection(clip_config()),
            tokenizer_2=clip_tokenizer(tok_dir),
            text_encoder_3=t5_encoder(32),
            tokenizer_3=t5_tokenizer(),
        )
    elif family == "flux":
        transformer = d.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        sched = d.FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )
        pipe = d.FluxPipeline(
            transformer=transformer,
            scheduler=sched,
            vae=tiny_vae(4, flow=True),
            text_encoder=CLIPTextModel(clip_config()),
            tokenizer=clip_tokenizer(tok_dir),
            text_encoder_2=t5_encoder(32),
            tokenizer_2=t5_tokenizer(),
        )
    else:
        raise ValueError(family)
    pipe.save_pretrained(str(folder))
    return pipe


def brightness_reward(images: torch.Tensor, prompts: list[str], metadata=None):
    """The toy reward: mean brightness of each image in [0, 1]."""
    r = images.detach().float().flatten(1).mean(1)
    return r, {"brightness": float(r.mean())}
