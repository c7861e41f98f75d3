"""The CLIP backbone adapter on a tiny random ``transformers.CLIPModel`` saved to a temporary folder
(built from a config and a small character vocabulary: nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from diffusers_helpers import save_tiny_clip  # noqa: E402
from t2ialign.models.generator import CheckpointError  # noqa: E402
from t2ialign.reward.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPBackbone  # noqa: E402
from t2ialign.reward.model import build_reward_model, load_reward_model, save_reward_model  # noqa: E402
from t2ialign.reward.rewards import ModelReward  # noqa: E402

PROMPTS = ["two blue circles", "a red square on a white background"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP (16 px images, 8-d projections) and a character-level CLIP tokenizer."""
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    folder.mkdir()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]:
        vocab[tok] = len(vocab)
    # a character-level BPE vocabulary with no merges (files, as transformers 4 and 5 both read them)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    return save_tiny_clip(folder, tokenizer, max_positions=48, projection=8)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return CLIPBackbone(clip_dir)


def test_tokenizer_is_local(clip):
    ids = clip.tokenizer(["two"])["input_ids"][0]
    assert ids[0] == 0 and ids[-1] == 1 and len(ids) == 5  # <start> t w o</w> <end>


def test_embeddings_and_pixel_gradients(clip):
    x = torch.rand(2, 3, 32, 32, requires_grad=True)  # the world's 32 px images, resized to 16
    img = clip.encode_image(x)
    txt = clip.encode_text(PROMPTS)
    assert img.shape == (2, 8) and txt.shape == (2, 8) and clip.embed_dim == 8
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    (img * txt).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in clip.parameters())


def test_preprocessing_matches_clip(clip):
    # at the native size only the normalisation applies
    x = torch.rand(1, 3, 16, 16)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(clip.preprocess(x), (x - mean) / std, atol=1e-6)
    # a constant image stays constant through the resize; a wide image is centre-cropped
    flat = torch.full((1, 3, 32, 48), 0.25)
    out = clip.preprocess(flat)
    assert out.shape == (1, 3, 16, 16)
    assert torch.allclose(out, (torch.full((1, 3, 16, 16), 0.25) - mean) / std, atol=1e-5)
    # the features are CLIP's own on the preprocessed pixels
    with torch.no_grad():
        want = clip.model.get_image_features(pixel_values=clip.preprocess(x))
        want = want if torch.is_tensor(want) else want.pooler_output
        assert torch.allclose(clip.encode_image(x), torch.nn.functional.normalize(want, dim=-1), atol=1e-5)


def test_preprocessor_config_is_read(clip_dir, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for f in clip_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    pre = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}
    pre |= {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    b = CLIPBackbone(folder)
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(b.preprocess(x), (x - 0.5) / 0.25, atol=1e-6)


def test_reward_model_on_clip(clip, clip_dir, tmp_path):
    model = build_reward_model(clip, hidden=8)
    save_reward_model(model, tmp_path / "r")
    card = json.loads((tmp_path / "r" / "card.json").read_text())
    assert card["backbone"]["type"] == "clip" and card["backbone"]["path"] == str(clip_dir.resolve())
    loaded = load_reward_model(tmp_path / "r")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    r, _ = ModelReward(loaded)(x, PROMPTS, None)
    with torch.no_grad():
        assert torch.allclose(r, model.eval()(x, PROMPTS), atol=1e-5)
    r.sum().backward()
    assert x.grad.abs().sum() > 0


def test_not_a_clip_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a CLIP folder"):
        CLIPBackbone(tmp_path)
